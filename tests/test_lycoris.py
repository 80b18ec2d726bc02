"""LyCORIS files (models/lycoris.py through models/lora.merge_lora) against the lycoris-lora package's own modules:
for every kind, each module's merged weight equals the weight the package's forward pass computes for the same
tensors (<= 1e-5 relative), on a linear layer, a 3x3 convolution, CLIP-L and one of bigG's fused q/k/v rows, at
scales 1 and 0.7. The files carry kohya's names, as real SDXL LyCORIS files do."""

import pytest
import torch
from safetensors.torch import save_file

from models.files import LoadError
from models.lora import kohya_name, merge_lora, sites
from models.sdxl import SDXL, TINY

SITES = {  # a label: (official module name, rows of bigG's fused projection or None)
    "linear": ("unet.output_blocks.3.1.transformer_blocks.0.attn2.to_k", None),
    "conv3x3": ("unet.input_blocks.1.0.in_layers.2", None),
    "clip-l": ("text_encoder_1.text_model.encoder.layers.0.mlp.fc1", None),
    "bigG q": ("text_encoder_2.transformer.resblocks.1.attn.in_proj", "q"),
}
KINDS = {  # a label: (lycoris class name, constructor keywords)
    "locon": ("LoConModule", dict(lora_dim=4, alpha=2)),
    "locon tucker": ("LoConModule", dict(lora_dim=4, alpha=3, use_tucker=True)),
    "loha": ("LohaModule", dict(lora_dim=4, alpha=2)),
    "loha tucker": ("LohaModule", dict(lora_dim=4, alpha=3, use_tucker=True)),
    "lokr": ("LokrModule", dict(lora_dim=2, alpha=1, factor=4)),
    "lokr both split": ("LokrModule", dict(lora_dim=1, alpha=1, factor=8, decompose_both=True)),
    "lokr full": ("LokrModule", dict(lora_dim=4, alpha=2, factor=4, full_matrix=True)),
    "lokr tucker": ("LokrModule", dict(lora_dim=2, alpha=1, factor=2, use_tucker=True)),
    "dora (locon)": ("LoConModule", dict(lora_dim=4, alpha=2, weight_decompose=True)),
    "dora (loha), input axis": ("LohaModule", dict(lora_dim=4, alpha=2, weight_decompose=True, wd_on_out=False)),
    "dora (lokr)": ("LokrModule", dict(lora_dim=2, alpha=1, factor=4, weight_decompose=True)),
    "oft": ("DiagOFTModule", dict(lora_dim=4)),
    "oft constrained, rescaled": ("DiagOFTModule", dict(lora_dim=4, constraint=1e-3, rescaled=True)),
    "boft": ("ButterflyOFTModule", dict(lora_dim=4)),
    "ia3": ("IA3Module", dict()),
    "ia3 on input": ("IA3Module", dict(train_on_input=True)),
    "full": ("FullModule", dict()),
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SDXL(TINY).eval()


def standalone(model, official, rows):
    """A copy of the site's layer on its own (a conv without padding, so one-hot k x k images read its weight)."""
    _, module, weight, paths = next(site for site in sites(model) if site[0] == official)
    path = next(p for p, r in paths if rows is None or p.endswith(f"{rows}_proj"))
    rows = next(r for p, r in paths if p == path)
    if isinstance(module, torch.nn.Conv2d):
        layer = torch.nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, bias=True)
        bias = module.bias
    else:
        w = weight[rows] if rows is not None else weight
        bias = module.bias if rows is None else model.get_submodule(official.removesuffix(".in_proj")).in_proj_bias[rows]
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight[rows] if rows is not None else weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return kohya_name(official, path), layer, (weight, rows)


def effective(layer, adapter):
    """The (weight, bias) the adapter's forward pass runs the layer with, read off its outputs."""
    with torch.no_grad():
        if isinstance(layer, torch.nn.Conv2d):
            c, (k, _) = layer.in_channels, layer.kernel_size
            basis = torch.eye(c * k * k).reshape(c * k * k, c, k, k)
            bias = adapter(torch.zeros(1, c, k, k)).reshape(-1)
            weight = (adapter(basis).reshape(c * k * k, -1) - bias).T.reshape(layer.out_channels, c, k, k)
        else:
            bias = adapter(torch.zeros(1, layer.in_features))[0]  # (zeros without a bias)
            weight = (adapter(torch.eye(layer.in_features)) - bias).T
    return weight, bias


@pytest.mark.parametrize("scale", [1.0, 0.7])
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_equals_the_packages_forward_pass(model, tmp_path, kind, scale):
    import lycoris.modules as modules

    cls, keywords = KINDS[kind]
    tensors, expected = {}, {}
    generator = torch.Generator().manual_seed(1)
    for official, rows in SITES.values():
        name, layer, (weight, rows) = standalone(model, official, rows)
        adapter = getattr(modules, cls)(name, layer, scale, **keywords).eval()
        if kind == "full":
            adapter.apply_to()  # its weight becomes W + diff (what it saves as diff is weight - W)
        with torch.no_grad():  # random values everywhere: several parts start at zero
            frozen = {id(getattr(layer, n, None)) for n in ("weight", "bias")}  # (full-diff took both away)
            for p in adapter.parameters():
                if id(p) not in frozen:
                    p.add_(torch.randn(p.shape, generator=generator) * 0.1) if kind == "full" else \
                        p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            if "dora" in kind:
                adapter.dora_scale.mul_(1 + 0.1 * torch.rand(adapter.dora_scale.shape, generator=generator))
        state = {k: v for k, v in adapter.state_dict().items() if not k.startswith("org_")}
        tensors |= {f"{name}.{k}": v.detach().clone().contiguous() for k, v in state.items()}
        expected[name] = (weight, rows, *effective(layer, adapter))
    file = tmp_path / f"{kind.replace(' ', '_')}.safetensors"
    save_file(tensors, str(file))
    merged = SDXL(TINY)
    merged.load_state_dict(model.state_dict())
    assert merge_lora(merged, file, scale) == len(expected)
    original = {id(p): n for n, p in model.named_parameters()}
    params = dict(merged.named_parameters())
    for name, (weight, rows, want, want_bias) in expected.items():
        weight_name = original[id(weight)]
        got = params[weight_name]
        got = got[rows] if rows is not None else got
        error = ((got - want).norm() / want.norm()).item()
        assert error <= 1e-5, f"{kind} at {scale}, {name}: relative error {error:.2e}"
        if want_bias.any():  # unchanged but for full-diff's diff_b
            bias = params[weight_name.replace("in_proj_weight", "in_proj_bias").replace(".weight", ".bias")]
            bias = bias[rows] if rows is not None else bias
            torch.testing.assert_close(bias, want_bias, rtol=1e-5, atol=1e-6, msg=f"{kind}: {name}'s bias")
        assert not torch.equal(want, weight[rows] if rows is not None else weight), f"{kind}: the adapter is a no-op"


def test_an_unsupported_lycoris_kind_is_named(model, tmp_path):
    name = kohya_name(*SITES["linear"][:1], SITES["linear"][0].removeprefix("unet."))
    save_file({f"{name}.a1.weight": torch.zeros(2, 2), f"{name}.a2.weight": torch.zeros(2, 2)}, str(tmp_path / "g.safetensors"))
    with pytest.raises(LoadError, match="GLoRA"):
        merge_lora(model, tmp_path / "g.safetensors", apply=False)
