"""Formats told apart by their structure (models.files.sniff), over the whole space rather than one example.

A safetensors file starts with its header length N as a little-endian u64, so its first byte is N mod 256
and can be anything: 0x80 (a pickle's first byte), "PK" (a zip's), 0x80 followed by a pickle protocol byte.
Files here are written with every such N (the header is padded with spaces, as the format allows) and must
load with every tensor equal; damaged files (truncated at every byte offset, every header byte flipped,
and random damage from hypothesis) must be refused in one line, never a traceback or a hang.
"""

import json
import pickle
import signal
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from models.files import LoadError, open_safetensors, read_tensors, sniff
from models.loading import BUNDLED, load, load_vae, save_single_file
from models.lora import merge_lora
from models.sdxl import SDXL, TINY

# TINY at its smallest (a few hundred kB): the residue sweep loads it hundreds of times.
MICRO = replace(
    TINY,
    unet=replace(TINY.unet, model_channels=16, channel_mult=(1, 2), transformer_depth=(0, 1), transformer_depth_middle=1,
                 norm_groups=4, head_channels=8),
    vae=replace(TINY.vae, ch=8, ch_mult=(1, 2, 2, 2), norm_groups=4),  # four levels: 8x, as SDXL
    text_encoder_1=replace(TINY.text_encoder_1, vocab_size=64, layers=2),
    text_encoder_2=replace(TINY.text_encoder_2, vocab_size=64, layers=2),
)
# Header lengths whose first bytes are what byte sniffers take for a pickle or a zip: 0x80 then protocol 2..5,
# and "PK" (0x4B50 as the low two bytes).
PICKLE_LIKE = [0x0280, 0x0380, 0x0480, 0x0580]
PK_LIKE = 0x4B50


@contextmanager
def deadline(seconds):
    """Fail instead of hanging: SIGALRM after `seconds`."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def split(path):
    """A safetensors file -> (header dict, data bytes)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def length_at_least(minimum, residue, modulus=256):
    """The smallest N >= minimum with N = residue (mod modulus)."""
    return minimum + (residue - minimum) % modulus


def rewrite(path, header, data, length):
    """The same file with a header exactly `length` bytes long (compact JSON, then spaces)."""
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    path.write_bytes(length.to_bytes(8, "little") + text + b" " * (length - len(text)) + data)
    return path


def lengths(header):
    """Every residue mod 256, the pickle-like and the PK residues mod 65536, from the header's own size up."""
    minimum = len(json.dumps(header, separators=(",", ":")))
    return ([length_at_least(minimum, r) for r in range(256)]
            + [length_at_least(minimum, r, 65536) for r in PICKLE_LIKE + [PK_LIKE]])


def one_line(error):
    message = str(error)
    assert message and "\n" not in message and "Traceback" not in message, message
    return message


def write_lora(model, path):
    """A kohya LoRA over one attention projection and one 3x3 conv (LoCon) of `model` (any device)."""
    g, lora = torch.Generator().manual_seed(1), {}
    for name in ("input_blocks.4.1.transformer_blocks.0.attn2.to_k", "input_blocks.1.0.in_layers.2"):
        w = model.unet.get_submodule(name).weight
        key = "lora_unet_" + name.replace(".", "_")
        lora[f"{key}.lora_down.weight"] = torch.randn(2, *w.shape[1:], generator=g)
        lora[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], 2, *([1, 1] if w.ndim == 4 else []), generator=g)
        lora[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(lora, path, metadata={"ss_network_dim": "2"})


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A MICRO model (fp16 file), its VAE in the official layout and a kohya LoRA for it; a LoRA for TINY."""
    root = tmp_path_factory.mktemp("formats")
    torch.manual_seed(0)
    model = SDXL(MICRO)
    save_single_file(model, root / "model.safetensors", dtype="fp16")
    save_file({k: v.contiguous() for k, v in model.vae.state_dict().items()}, root / "vae.safetensors")
    write_lora(model, root / "lora.safetensors")
    with torch.device("meta"):  # shapes only
        tiny = SDXL(TINY)
    write_lora(tiny, root / "lora_tiny.safetensors")
    return root


def merged(model_path, lora_path):
    model = load(model_path, dtype="fp32")
    merge_lora(model, lora_path, 0.7)
    return model.unet.state_dict()


# ----------------------------------------------------------------------------- the rules, one case each


def test_sniff_tells_each_format_by_its_structure(tmp_path):
    header = {"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    for n in PICKLE_LIKE + [128, PK_LIKE]:
        kind, why = sniff(rewrite(tmp_path / f"{n}.safetensors", header, b"\0" * 4, n))
        assert (kind, why) == ("safetensors", None), n
    for protocol in (2, 3, 4, 5):
        (tmp_path / "p").write_bytes(pickle.dumps({"w": [1.0] * 50}, protocol=protocol))
        assert sniff(tmp_path / "p")[0] == "pickle"
    torch.save({"w": torch.zeros(2)}, tmp_path / "z")
    assert sniff(tmp_path / "z")[0] == "zip"
    cases = {b"": "shorter than the 8-byte", (5).to_bytes(8, "little") + b"[1,2]": "a JSON list",
             (3).to_bytes(8, "little") + b"{}": "does not fit", (4).to_bytes(8, "little") + b"{x} ": "is not JSON",
             (1).to_bytes(8, "little") + b"{": "does not fit"}
    for raw, fragment in cases.items():
        (tmp_path / "u").write_bytes(raw)
        kind, why = sniff(tmp_path / "u")
        assert kind == "unknown" and fragment in why, (raw, why)


def test_a_valid_file_named_like_a_pickle_loads_and_a_damaged_one_is_called_a_pickle(tmp_path, micro):
    (tmp_path / "lora.ckpt").write_bytes((micro / "lora.safetensors").read_bytes())
    with open_safetensors(tmp_path / "lora.ckpt") as f:
        assert len(list(f.keys())) == 6
    (tmp_path / "old.ckpt").write_bytes(b"\x00" * 40)
    with pytest.raises(LoadError, match="is a pickle checkpoint"):
        open_safetensors(tmp_path / "old.ckpt")


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.safetensors")
    with deadline(10), pytest.raises(LoadError, match="not a regular file"):
        open_safetensors(tmp_path / "pipe.safetensors")


# ----------------------------------------------------------------------------- every valid header length loads


@pytest.mark.slow
def test_lora_files_with_every_header_length_load(micro, tmp_path):
    header, data = split(micro / "lora.safetensors")
    expected = merged(micro / "model.safetensors", micro / "lora.safetensors")
    model = load(micro / "model.safetensors", dtype="fp32")
    base = {k: v.clone() for k, v in model.unet.state_dict().items()}
    for n in lengths(header):
        merge_lora(model, rewrite(tmp_path / "lora.safetensors", header, data, n), 0.7)
        got = model.unet.state_dict()
        assert all(torch.equal(got[k], expected[k]) for k in expected), f"header length {n}"
        model.unet.load_state_dict(base)  # back to the base for the next file


@pytest.mark.slow
def test_vae_files_with_every_header_length_load(micro, tmp_path):
    header, data = split(micro / "vae.safetensors")
    expected = load_vae(micro / "vae.safetensors", like=MICRO.vae).state_dict()
    for n in lengths(header):
        got = load_vae(rewrite(tmp_path / "vae.safetensors", header, data, n), like=MICRO.vae).state_dict()
        assert all(torch.equal(got[k], expected[k]) for k in expected), f"header length {n}"


@pytest.mark.slow
def test_model_files_with_every_header_length_load(micro, tmp_path):
    header, data = split(micro / "model.safetensors")
    expected = load(micro / "model.safetensors").state_dict()
    for n in lengths(header):
        got = load(rewrite(tmp_path / "model.safetensors", header, data, n)).state_dict()
        assert all(torch.equal(got[k], expected[k]) for k in expected), f"header length {n}"


@pytest.mark.slow
def test_a_header_that_starts_with_the_zip_magic_loads(micro, tmp_path):
    """N = 0x04034B50 (67 MB of header): the file's first four bytes are PK\\x03\\x04, a zip's magic."""
    header, data = split(micro / "lora.safetensors")
    path = rewrite(tmp_path / "zip_like.safetensors", header, data, 0x04034B50)
    assert path.read_bytes()[:4] == b"PK\x03\x04" and sniff(path)[0] == "safetensors"
    names = [k for k in header if k != "__metadata__"]
    tensors = dict(read_tensors(path, names))
    assert all(torch.equal(tensors[k], v) for k, v in read_tensors(micro / "lora.safetensors", names))


# ----------------------------------------------------------------------------- every damaged file is one line


def check_lora(model, path):
    """What --lora does before the load: LoadError or the number of modules it changes."""
    return merge_lora(model, path, 1.0, apply=False)


@pytest.mark.slow
def test_a_lora_truncated_at_every_byte_is_one_line(micro, tmp_path):
    raw = (micro / "lora.safetensors").read_bytes()
    with torch.device("meta"):
        model = SDXL(MICRO)
    with deadline(300):
        for k in range(len(raw)):
            (tmp_path / "t.safetensors").write_bytes(raw[:k])
            with pytest.raises(LoadError) as e:
                check_lora(model, tmp_path / "t.safetensors")
            assert "truncated or not a valid safetensors file" in one_line(e.value), k
    assert len(raw) > 1000  # every offset of a file with a header and data


@pytest.mark.slow
def test_a_lora_with_any_header_byte_flipped_is_one_line(micro, tmp_path):
    raw = (micro / "lora.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    with torch.device("meta"):
        model = SDXL(MICRO)
    with deadline(300):
        for i in range(8 + n):  # the length itself, then every byte of the JSON header
            damaged = bytearray(raw)
            damaged[i] ^= 0xFF
            (tmp_path / "f.safetensors").write_bytes(damaged)
            with pytest.raises(LoadError) as e:
                check_lora(model, tmp_path / "f.safetensors")
            one_line(e.value)


DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "U8": torch.uint8}


@st.composite
def damaged_files(draw):
    """A random valid safetensors file (names, dtypes, shapes, metadata), then damaged: cut at a random byte,
    or a random nonzero mask XORed into one random byte of the length or the header."""
    count = draw(st.integers(0, 4))
    names = draw(st.lists(st.text("abcxyz._0123456789", min_size=1, max_size=12), min_size=count, max_size=count,
                          unique=True))
    tensors = {}
    for name in names:
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        tensors[name] = torch.ones(shape, dtype=DTYPES[draw(st.sampled_from(sorted(DTYPES)))])
    metadata = draw(st.none() | st.dictionaries(st.text("abc", max_size=4), st.text("xyz ", max_size=8), max_size=2))
    return tensors, metadata, draw(st.booleans()), draw(st.integers(0, 10**9)), draw(st.integers(1, 255))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damaged_files())
def test_random_damage_is_one_line_or_read_as_safetensors_reads_it(tmp_path, case):
    """Every outcome is one of two: refused in one line, or a file that is still valid (a flip inside a name,
    a metadata value or the padding), read exactly as safetensors' own reader reads it. Never a traceback or
    a hang. (Whether a valid file's names and shapes fit a model is the loaders' check, tested elsewhere.)"""
    tensors, metadata, cut, where, mask = case
    path = tmp_path / "h.safetensors"
    save_file(tensors, path, metadata=metadata)
    raw = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    if cut:
        raw = raw[:where % len(raw)]
    else:
        raw[where % header_end] ^= mask
    path.write_bytes(raw)
    with deadline(30):
        try:
            with open_safetensors(path) as f:
                names = list(f.keys())
            got = dict(read_tensors(path, names))
        except LoadError as e:
            one_line(e)
            return
    assert not cut, "a file cut short was read"
    with safe_open(path, "pt") as f:
        assert all(torch.equal(got[k], f.get_tensor(k)) for k in names)


def damage(raw, cut, where, mask):
    """raw cut at byte `where` (mod its length), or with `mask` XORed into one byte of its length or header."""
    raw = bytearray(raw)
    if cut:
        return raw[:where % len(raw)]
    raw[where % (8 + int.from_bytes(raw[:8], "little"))] ^= mask
    return raw


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.booleans(), where=st.integers(0, 10**9), mask=st.integers(1, 255))
def test_a_damaged_model_or_vae_file_is_one_line_or_loads(micro, tmp_path, cut, where, mask):
    """The loaders over random damage: refused in one line, or a file still valid (a flipped name is then
    refused by the loader's own checks, a flipped metadata byte loads)."""
    for name, read in (("model.safetensors", load), ("vae.safetensors", lambda p: load_vae(p, like=MICRO.vae))):
        path = tmp_path / name
        path.write_bytes(damage((micro / name).read_bytes(), cut, where, mask))
        with deadline(60):
            try:
                read(path)
            except LoadError as e:
                one_line(e)
                continue
        assert not cut, "a file cut short was loaded"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["--model", "--lora", "--vae"]), cut=st.booleans(), where=st.integers(0, 10**9),
       mask=st.integers(1, 255))
@pytest.mark.slow
def test_the_command_line_refuses_damaged_files_in_one_line(micro, tmp_path, capsys, which, cut, where, mask):
    """sampling.generate (in-process: the same main) on the bundled model with a damaged model, LoRA or VAE:
    exit 2 and one line, or (damage that leaves a valid file) an image."""
    from sampling.generate import main

    source = {"--model": BUNDLED["plainxl-tiny"], "--lora": micro / "lora_tiny.safetensors",
              "--vae": micro / "vae.safetensors"}[which]
    damaged = tmp_path / f"damaged-{source.name}"
    damaged.write_bytes(damage(source.read_bytes(), cut, where, mask))
    args = {"--model": "plainxl-tiny", which: damaged}
    out = Path(tempfile.mkdtemp(dir=tmp_path)) / "out"  # one per example: hypothesis reuses tmp_path across them
    with deadline(60):
        code = main([*(str(a) for kv in args.items() for a in kv), "--prompt", "x", "--steps", "1", "--width", "64",
                     "--height", "64", "--out", str(out)])
    err = capsys.readouterr().err
    if code == 0:  # a flip inside a metadata value or the padding
        assert not cut and len(list(out.iterdir())) == 1
        return
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.slow
def test_a_damaged_file_through_a_real_process_is_one_line(micro, tmp_path):
    """One case through a real interpreter: what a user sees, exit code and all."""
    import subprocess
    import sys

    raw = (micro / "lora.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:len(raw) // 2])
    r = subprocess.run([sys.executable, "-m", "sampling.generate", "--model", str(micro / "model.safetensors"),
                        "--lora", str(tmp_path / "cut.safetensors"), "--prompt", "x", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "truncated or not a valid safetensors file" in r.stderr and not (tmp_path / "o").exists()
