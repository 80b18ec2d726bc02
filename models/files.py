"""The safetensors file layer, at the bottom of models/: tell safetensors from pickles by structure
(sniff), read tensors lazily, write files and folders atomically with the user's umask, check output
paths before any work, and hash a file as AUTOMATIC1111 does.

Every problem with the input becomes a LoadError: one sentence naming the problem and the fix.
Nothing here knows what an SDXL model is.
"""

import hashlib
import importlib.util
import json
import mmap
import os
import re
import shutil
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Names pickles go by: only for the message about a damaged file (a valid safetensors file loads whatever its name).
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FLOAT8_COMPUTE = torch.bfloat16  # float8-stored weights are cast to this when no dtype is asked for


class LoadError(Exception):
    """Bad input to a loader or saver; the message is the whole explanation (no traceback needed)."""


# ----------------------------------------------------------------------------- reading


SAFETENSORS_MAX_HEADER = 100_000_000  # bytes; safetensors' own reader refuses longer headers


def sniff(path):
    """(kind, why) of a file by its structure, never by its name or one byte: kind is "safetensors", "zip"
    (torch's zip checkpoints), "pickle" (a raw pickle) or "unknown", why says what failed for a file that is
    not safetensors. The rules, in this order (a valid safetensors file can start with any byte, also 0x80
    or "PK", since it starts with its header length):
      safetensors: the first 8 bytes are a little-endian header length N, 2 <= N <= size - 8, and the N
        bytes after them parse as a JSON object (safe_open then checks every tensor's offsets);
      zip: the zip local-file magic PK\x03\x04;
      pickle: 0x80 (PROTO) followed by a protocol byte 2-5.
    Only the first 8 + N bytes are read."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        if n is None:
            why = f"it is {size} bytes long, shorter than the 8-byte header length"
        elif not 2 <= n <= size - 8:
            why = f"its header length {n} does not fit in its {size} bytes"
        elif n > SAFETENSORS_MAX_HEADER:
            why = f"its header length {n} is over safetensors' limit of {SAFETENSORS_MAX_HEADER}"
        else:
            try:
                header = json.loads(f.read(n))
                why = None if isinstance(header, dict) else f"its header is a JSON {type(header).__name__}"
            except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors;
                why = "its header is not JSON"        # RecursionError: brackets nested thousands deep
    if why is None:
        return "safetensors", None
    if head[:4] == b"PK\x03\x04":
        return "zip", why
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle", why
    return "unknown", why


def check_safetensors(path):
    """A LoadError unless `path` is a regular file that sniff() calls safetensors. Pickles (zip or raw, or a
    damaged file named like one) are refused unopened: unpickling can run arbitrary code."""
    path = Path(path)
    try:
        if path.is_dir():
            raise LoadError(f"{path} is a folder, not a .safetensors file; pass the file inside it.")
        if not path.exists():
            raise LoadError(f"{path} does not exist; pass a .safetensors file.")
        if not path.is_file():  # a FIFO or a device would block or never end
            raise LoadError(f"{path} is not a regular file; pass a .safetensors file.")
        kind, why = sniff(path)
    except OSError as e:
        raise LoadError(f"cannot read {path} ({e.strerror}); check that it is a file you may read.") from None
    if kind in ("zip", "pickle") or kind == "unknown" and path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoadError(
            f"{path} is a pickle checkpoint, which can run arbitrary code when opened, so it is not loaded; "
            "convert it to .safetensors with a tool you trust, or download the .safetensors version."
        )
    if kind != "safetensors":
        raise LoadError(f"{path} is truncated or not a valid safetensors file ({why}); download it again.")


def open_safetensors(path):
    """safetensors' own reader, for the header: names, shapes, metadata, and its validity checks."""
    check_safetensors(path)
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise LoadError(f"{path} is truncated or not a valid safetensors file ({e}); download it again.") from None


def cast(t, dtype):
    """t in dtype if it is floating (same dtype: the same tensor). float8 storage is not a compute
    dtype: with no dtype asked for it becomes FLOAT8_COMPUTE."""
    if dtype is None and t.dtype in FLOAT8:
        dtype = FLOAT8_COMPUTE
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def read_tensors(path, names, dtype=None):
    """Yield (name, tensor) for `names` of a safetensors file (already checked by open_safetensors), cast.

    The file is memory-mapped copy-on-write: a tensor the cast leaves alone is a view of the map (no
    copy; writes stay private). When the cast copies, the pages of the original are released right
    away, so the peak is the weights at the target dtype, not that plus the file (fp16 -> fp32 of
    SDXL: 13 GiB instead of 19.7).
    """
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")  # layout: u64 length, JSON header, data
        header = json.loads(f.read(header_len))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    data_start = 8 + header_len
    for name in names:
        info = header[name]
        begin, end = (data_start + o for o in info["data_offsets"])
        stored = SAFETENSORS_DTYPES[info["dtype"]]
        if end == begin:
            t = torch.empty(info["shape"], dtype=stored)
        else:
            t = torch.frombuffer(mm, dtype=stored, count=(end - begin) // stored.itemsize, offset=begin)
            t = t.reshape(info["shape"])
            if begin % stored.itemsize:  # a header whose length is not padded to 8 (valid; some writers do it):
                t = t.clone()            # kernels may assume aligned data, so take an aligned copy
        out = cast(t, dtype)
        if out is not t and end - begin > mmap.PAGESIZE and hasattr(mm, "madvise"):  # madvise: not on Windows
            # Release only whole pages inside this tensor; a page shared with a neighbour stays.
            lo = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE
            hi = end // mmap.PAGESIZE * mmap.PAGESIZE
            if hi > lo:
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        yield name, out


# ----------------------------------------------------------------------------- writing


def _umask():
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _temp_prefix(dst):
    # The writer's pid is in the name, so a later writer can tell a stale temporary (its writer is
    # gone: killed mid-write) from one being written right now by another process.
    return f".{dst.name}.{os.getpid()}."


def _remove_stale_temporaries(dst):
    if os.name != "posix":  # os.kill(pid, 0) only asks "does it exist" on POSIX
        return
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.(\d+)\.[\w-]+\.tmp")  # what atomic_file/_folder name them
    for tmp in dst.parent.iterdir():
        m = pattern.fullmatch(tmp.name)
        if not m or int(m[1]) == os.getpid():
            continue
        try:
            os.kill(int(m[1]), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, another user's


def check_output(path, what, folder=True):
    """Path(path), or a LoadError (before any work) if it cannot become the output `what` names: a folder
    (created if missing), else a file whose folder exists. What is in the way is named: a file where a
    folder is needed, anywhere along the path (FILE/run), or a folder where a file is to be written."""
    path = Path(path)
    try:
        if not folder and path.is_dir():
            raise LoadError(f"{what} {path} is a folder; name a file to write.")
        parent = path if folder else path.parent
        for p in (parent, *parent.parents):
            if p.is_dir():
                break
            if p.exists() or p.is_symlink():  # a file, or a link to nowhere
                kind = "a file" if p.exists() else "a link to nowhere"
                where = f"is {kind}" if p == path else f"is inside {p}, which is {kind}"
                raise LoadError(f"{what} {path} {where}, not a folder; choose another path.")
        if not folder and not parent.is_dir():
            raise LoadError(f"{what} {path}: the folder {parent} does not exist; create it first.")
    except OSError as e:  # a folder on the way we may not look into
        raise LoadError(f"{what} {path} cannot be checked ({e.strerror}: {e.filename}); choose a path you may "
                        "write to.") from None
    return path


def output_or_exit(path, what, folder=True):
    """check_output for a script's main: a bad path ends the script with its one line (SystemExit with the
    text: Python prints it to stderr and exits 1), no traceback."""
    try:
        return check_output(path, what, folder)
    except LoadError as e:
        raise SystemExit(f"error: {e}") from None


def check_destination(dst, overwrite, kind="file", replaceable=None):
    """dst as a Path, or a LoadError if writing there could destroy something.

    An existing dst is replaced only with overwrite=True, and only if it is of the kind this writer makes
    (`replaceable(path)` for folders): `--overwrite` never removes anything but a model we could have written.
    """
    dst = Path(dst)
    if dst.name in ("", ".", "..") or dst.resolve() in (Path.home().resolve(), Path("/")):
        raise LoadError(f"{dst} names a folder that holds other things, not a new model; give a new name, e.g. "
                        f"{dst.resolve() / ('model.safetensors' if kind == 'file' else 'model')}.")
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise LoadError(f"{dst} already exists; choose another destination or pass --overwrite.")
        is_kind = dst.is_file() if kind == "file" else dst.is_dir() and (replaceable is None or replaceable(dst))
        if not is_kind:
            what = "a .safetensors file" if kind == "file" else "a diffusers model folder"
            raise LoadError(f"{dst} exists and is not {what}, so --overwrite will not replace it; "
                            "choose another destination.")
    return dst if dst.exists() else check_output(dst, "destination", folder=False)


@contextmanager
def atomic_file(dst, overwrite=False):
    """Yield a temporary path beside dst; on success it becomes dst with the umask's permissions.

    With overwrite=False the final step is a hard link, which fails if dst appeared meanwhile: a file
    that exists is never replaced unasked, even by a concurrent writer. Raises FileExistsError then."""
    dst = Path(dst)
    _remove_stale_temporaries(dst)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=_temp_prefix(dst), suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: other users' tools could not read the file
        if overwrite:
            os.replace(tmp, dst)
        else:
            try:
                os.link(tmp, dst)
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links (FAT, some network shares)
                if dst.exists():
                    raise FileExistsError(dst) from None
                os.replace(tmp, dst)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def atomic_folder(dst, overwrite=False, replaceable=None):
    """Yield a temporary folder beside dst; on success it becomes dst. An existing dst is replaced only with
    overwrite=True and if `replaceable(dst)` still holds (checked again: minutes may have passed since
    check_destination); it is renamed aside first, so that a failure at any point leaves one of the two."""
    dst = Path(dst)
    _remove_stale_temporaries(dst)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=_temp_prefix(dst), suffix=".tmp"))
    old = None
    try:
        yield tmp
        mask = _umask()
        for path in [tmp, *tmp.rglob("*")]:
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
        if dst.exists() or dst.is_symlink():
            if not overwrite or not dst.is_dir() or (replaceable is not None and not replaceable(dst)):
                raise FileExistsError(dst)
            old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=_temp_prefix(dst), suffix=".tmp"))
            os.replace(dst, old / "previous")  # dst is free now; the old folder waits inside `old`
        os.replace(tmp, dst)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if old is not None and old.exists() and not dst.exists():
            os.replace(old / "previous", dst)  # the new folder did not make it: the old one comes back
            shutil.rmtree(old)


# ----------------------------------------------------------------------------- hashing

HASH_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "plainxl" / "hashes.json"


def model_hash(path):
    """AUTOMATIC1111's `Model hash`: sha256 of the whole file, first 10 hex digits.

    Cached by (absolute path, size, mtime), so a 7 GB file is read once; a cache that cannot be read or
    written is only a slower hash."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        cache = json.loads(HASH_CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    cache[key] = digest.hexdigest()[:10]
    try:
        HASH_CACHE.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(HASH_CACHE, overwrite=True) as tmp:
            tmp.write_text(json.dumps(cache, indent=0))
    except OSError:
        pass
    return cache[key]


def read_config_file(path):
    """A config file's `config` dict (trainer and ablation configs); ValueError in one sentence for a file
    that is missing, does not parse, raises, or defines no such dict."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # a config file is Python the user wrote: a plain `config = dict(...)`
    except SyntaxError as e:
        raise ValueError(f"config file {path} has a syntax error on line {e.lineno}: {e.msg}") from None
    except Exception as e:  # anything the user's Python raises: say where, not a traceback
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == str(path)), "?")
        raise ValueError(f"config file {path} raised {type(e).__name__} on line {line}: {e}") from None
    if not isinstance(getattr(module, "config", None), dict):
        raise ValueError(f"config file {path} must define `config = dict(field=value, ...)`")
    return dict(module.config)
