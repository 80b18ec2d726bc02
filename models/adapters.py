"""The adapters a LoRA DreamBooth run trains beside the frozen SDXL (train/config.py's lora_type), hooked onto
its modules, and their export: kohya's format for LoRA, LyCORIS' (as the lycoris-lora package saves it) for the
others. Every kind loads back through models/lora.py, as any downloaded file does.

    lora_type  parameters (exported as)                              the weight change, s = alpha / rank
    lora       down (r, in[, k, k]), up (out, r[, 1, 1])             s up @ down       (kohya's LoRA; LoCon on convs)
               (lora_down.weight, lora_up.weight, alpha)
    loha       w1a (out, r), w1b (r, in k k), w2a, w2b               s (w1a @ w1b) * (w2a @ w2b)     (Hadamard)
               (hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, alpha)
    lokr       w1 (a, c), w2 (b, d[, k, k]) or w2a (b, r), w2b       s kron(w1, w2a @ w2b), a b = out, c d = in
               (r, d k k) (lokr_w1, lokr_w2 | lokr_w2_a/_b, alpha)   (s = 1 when w2 is whole)
    dora       lora's + magnitude (out,) (+ dora_scale (out, 1..))   W' = V g / |V| per output row, V = W + s up @ down

Each starts as a no-op (a zero factor: up, w2a, w2b or w2; DoRA's g = |W|) and is initialised as lycoris-lora
4.1.3 initialises it. Papers: LoRA, Hu et al. 2021; LoHa, Hyeon-Woo et al. 2022 (FedPara); LoKr, Edalati et al.
2022 (KronA) and Yeh et al. 2024 (LyCORIS); DoRA, Liu et al. 2024. They are forward hooks, so the model keeps the
checkpoint's module tree and names.
"""

import json
import math
from functools import partial

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from models.files import atomic_file
from models.lora import kohya_name, matches, sites
from models.single_file import check_finite
from models.text import Projection

KOHYA_TARGETS = (  # kohya's default SDXL set (networks/lora.py): transformer blocks; text encoders' attention and MLP
    "unet.*.proj_in", "unet.*.proj_out", "unet.*.attn[12].to_[qkv]", "unet.*.attn[12].to_out.0",
    "unet.*.ff.net.0.proj", "unet.*.ff.net.2",
    "text_encoder_1.*.self_attn.*_proj", "text_encoder_1.*.mlp.fc[12]",
    "text_encoder_2.*.attn.in_proj", "text_encoder_2.*.attn.out_proj", "text_encoder_2.*.mlp.c_*",
)
CONV_TARGETS = (  # added with a conv rank, as kohya's conv_dim: everything in ResBlocks, down- and upsamplers
    "unet.*.in_layers.2", "unet.*.emb_layers.1", "unet.*.out_layers.3", "unet.*.skip_connection", "unet.*.op", "unet.*.conv",
)
LORA_TYPES = ("lora", "loha", "lokr", "dora")


def layer(x, delta, layout):
    """x through a layer whose weight is `delta`: F.linear, or F.conv2d with the frozen conv's stride and padding."""
    return F.linear(x, delta) if layout is None else F.conv2d(x, delta, **layout)


class Adapter(torch.nn.Module):
    """What every kind shares: the frozen layer's weight shape (out, in[, k, k]), rank, alpha and conv layout."""

    def __init__(self, weight, rank, alpha, conv=None):
        super().__init__()
        self.shape, self.rank, self.alpha = tuple(weight.shape), rank, alpha
        self.layout = None if conv is None else dict(stride=conv.stride, padding=conv.padding)

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    def forward(self, x, weight):
        """The change to the layer's output for input x; `weight` is the frozen weight (the rows it adapts)."""
        return layer(x, self.delta(), self.layout)


class LoRA(Adapter):
    """(alpha / rank) * up(down(x)) (Hu et al. 2021; LoCon for convolutions: down has the conv's kernel, up is
    1x1). down starts as kohya's (Kaiming-uniform, a = sqrt(5)), up at zero."""

    def __init__(self, weight, rank, alpha, conv=None, generator=None):
        super().__init__(weight, rank, alpha, conv)
        out_features, in_features = self.shape[:2]
        if conv is None:
            self.down, self.up = torch.nn.Linear(in_features, rank, bias=False), torch.nn.Linear(rank, out_features, bias=False)
        else:
            self.down = torch.nn.Conv2d(in_features, rank, conv.kernel_size, conv.stride, conv.padding, bias=False)
            self.up = torch.nn.Conv2d(rank, out_features, 1, bias=False)
        torch.nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
        torch.nn.init.zeros_(self.up.weight)

    def forward(self, x, weight):
        return self.up(self.down(x)) * (self.alpha / self.rank)  # two thin layers: cheaper than the whole delta

    def delta(self):
        return (self.up.weight.flatten(1) @ self.down.weight.flatten(1)).reshape(self.shape) * (self.alpha / self.rank)

    def tensors(self):
        return {"lora_down.weight": self.down.weight, "lora_up.weight": self.up.weight}


class DoRA(LoRA):
    """LoRA with the weight decomposed (Liu et al. 2024, https://arxiv.org/abs/2402.09353), as LyCORIS' LoCon
    with dora_wd: V = W + s up @ down, W' = V g / |V| with |V| per output row; g starts at |W|."""

    def __init__(self, weight, rank, alpha, conv=None, generator=None):
        super().__init__(weight, rank, alpha, conv, generator)
        self.magnitude = torch.nn.Parameter(torch.linalg.vector_norm(weight.detach().float().flatten(1), dim=1))  # (out,)

    def forward(self, x, weight):
        weight = weight.to(self.dtype)
        merged = weight + self.delta()
        norm = torch.linalg.vector_norm(merged.flatten(1), dim=1) + torch.finfo(merged.dtype).eps  # (out,)
        factor = (self.magnitude / norm).reshape(-1, *[1] * (weight.ndim - 1))  # (out, 1[, 1, 1])
        return layer(x, merged * factor - weight, self.layout)

    def tensors(self):
        return super().tensors() | {"dora_scale": self.magnitude.reshape(-1, *[1] * (len(self.shape) - 1))}


class LoHa(Adapter):
    """s (w1a @ w1b) * (w2a @ w2b): the Hadamard product of two rank-r products, rank up to r^2 (FedPara,
    Hyeon-Woo et al. 2022). LyCORIS' init: w1b, w2b ~ N(0, 1), w1a ~ N(0, 0.1), w2a = 0."""

    def __init__(self, weight, rank, alpha, conv=None, generator=None):
        super().__init__(weight, rank, alpha, conv)
        out_features, fan_in = self.shape[0], math.prod(self.shape[1:])  # convs flatten (in, k, k)
        self.w1a, self.w2a = (torch.nn.Parameter(torch.empty(out_features, rank)) for _ in range(2))
        self.w1b, self.w2b = (torch.nn.Parameter(torch.empty(rank, fan_in)) for _ in range(2))
        torch.nn.init.normal_(self.w1b, std=1, generator=generator)
        torch.nn.init.normal_(self.w1a, std=0.1, generator=generator)
        torch.nn.init.normal_(self.w2b, std=1, generator=generator)
        torch.nn.init.zeros_(self.w2a)

    def delta(self):
        return ((self.w1a @ self.w1b) * (self.w2a @ self.w2b)).reshape(self.shape) * (self.alpha / self.rank)

    def tensors(self):
        return {"hada_w1_a": self.w1a, "hada_w1_b": self.w1b, "hada_w2_a": self.w2a, "hada_w2_b": self.w2b}


def factorization(dimension, factor=-1):
    """dimension = m * n with m <= n, as lycoris-lora splits it: a factor that divides it, else the largest
    divisor m <= sqrt(dimension) (and <= factor when factor > 0). 1280 -> (32, 40); a prime p -> (1, p)."""
    if factor > 0 and dimension % factor == 0:
        return tuple(sorted((factor, dimension // factor)))
    bound = math.isqrt(dimension) if factor <= 0 else min(factor, math.isqrt(dimension))
    m = max(d for d in range(1, bound + 1) if dimension % d == 0)
    return m, dimension // m


class LoKr(Adapter):
    """s kron(w1, w2) (KronA, Edalati et al. 2022; LyCORIS' LoKr): w1 (a, c) whole, w2 (b, d[, k, k]) as a
    rank-r product unless r >= max(b, d) / 2, when it is whole and s = 1; out = a b, in = c d split by
    `factorization`. LyCORIS' init: Kaiming-uniform everywhere but the zero w2b (or whole w2)."""

    def __init__(self, weight, rank, alpha, conv=None, generator=None, factor=-1):
        super().__init__(weight, rank, alpha, conv)
        (a, b), (c, d), kernel = factorization(self.shape[0], factor), factorization(self.shape[1], factor), self.shape[2:]
        self.w1 = torch.nn.Parameter(torch.empty(a, c))
        self.whole = rank >= max(b, d) / 2
        if self.whole:
            self.w2 = torch.nn.Parameter(torch.zeros(b, d, *kernel))
            self.alpha = rank  # s = 1, as LyCORIS (its alpha is set to the rank too)
        else:
            self.w2a = torch.nn.Parameter(torch.empty(b, rank))
            self.w2b = torch.nn.Parameter(torch.zeros(rank, d * math.prod(kernel)))
            torch.nn.init.kaiming_uniform_(self.w2a, a=math.sqrt(5), generator=generator)
        torch.nn.init.kaiming_uniform_(self.w1, a=math.sqrt(5), generator=generator)

    def delta(self):
        w2 = self.w2 if self.whole else (self.w2a @ self.w2b).reshape(self.w2a.shape[0], -1, *self.shape[2:])
        w1 = self.w1.reshape(*self.w1.shape, *[1] * (len(self.shape) - 2))  # (a, c[, 1, 1]) for a conv's kron
        return torch.kron(w1, w2) * (self.alpha / self.rank)  # (a b, c d[, k, k])

    def tensors(self):
        return {"lokr_w1": self.w1} | ({"lokr_w2": self.w2} if self.whole else {"lokr_w2_a": self.w2a, "lokr_w2_b": self.w2b})


ADAPTERS = {"lora": LoRA, "loha": LoHa, "lokr": LoKr, "dora": DoRA}


def adapter_hook(group):
    """A forward hook adding the adapters' outputs to the module's; group: [(adapter, rows of the weight or None)]
    (several side by side: bigG's q, k, v)."""
    def hook(module, inputs, output):
        x, dtype = inputs[0], group[0][0].dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):  # a bf16 base's validation images
            x = x.to(dtype)
        weight = inputs[1] if isinstance(module, Projection) else module.weight  # (bigG's in_proj is passed its weight)
        deltas = [adapter(x, weight if rows is None else weight[rows]) for adapter, rows in group]
        delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1)
        return output + delta.to(output.dtype)
    return hook


def add_adapters(model, patterns, rank, alpha, conv_rank=0, allowed=None, seed=0, kind="lora", factor=-1):
    """Adapters of `kind` (LORA_TYPES) on every module whose official name matches a pattern (and whose weight is
    in `allowed`, the parameter names train= picks, if given), as forward hooks. 1x1 and linear get `rank`,
    larger kernels `conv_rank` (kohya's conv_dim), with alpha scaled so that alpha / rank is the same; `factor`
    splits LoKr's dimensions. Returns a ModuleDict keyed by kohya name. ValueError (one sentence) for a pattern
    that matches no module, a 3x3 conv without conv_rank, or nothing chosen at all."""
    chosen, used = [], set()
    for official, module, weight, paths in sites(model):
        hits = [p for p in patterns if matches(official, p)]
        used.update(hits)
        if hits and (allowed is None or f"{official}.weight" in allowed
                     or isinstance(module, Projection) and f"{official}_weight" in allowed):
            chosen.append((official, module, weight, paths))
    missing = [p for p in patterns if p not in used and getattr(model, p.split(".")[0], True) is not None]
    if missing:  # (a default pattern for an encoder this model lacks, a refiner's CLIP-L, is not a mistake)
        raise ValueError(f"lora_targets pattern {missing[0]!r} matches no module of the model; patterns are fnmatch "
                         "over official module names, e.g. 'unet.*.attn2.to_k' or 'text_encoder_1.*.mlp.fc1'")
    if not chosen:
        raise ValueError("lora_targets and train= have no module in common, so nothing would train; e.g. "
                         "train=['unet'] with the default lora_targets")
    generator = torch.Generator().manual_seed(seed)  # the same adapters on every process and every resume
    make = partial(LoKr, factor=factor) if kind == "lokr" else ADAPTERS[kind]
    adapters = torch.nn.ModuleDict()
    for official, module, weight, paths in chosen:
        r = rank if weight.shape[2:].numel() == 1 else conv_rank  # Linear (no kernel dims) and 1x1 convs: rank
        if r == 0:
            raise ValueError(f"lora_targets picks {official}, a {'x'.join(map(str, weight.shape[2:]))} convolution: "
                             "set lora_conv_rank (kohya's conv_dim), or leave it out of lora_targets")
        group = []
        for path, rows in paths:
            conv = module if isinstance(module, torch.nn.Conv2d) else None
            adapter = make(weight if rows is None else weight[rows], r, alpha * r / rank, conv, generator)
            adapters[kohya_name(official, path)] = adapter.to(weight.device)
            group.append((adapter, rows))
        module.register_forward_hook(adapter_hook(group))
    return adapters


def save_adapters(adapters, dst, dtype, metadata):
    """Each adapter's tensors under <kohya name>.<its name> (LoRA: kohya's lora_down/lora_up; the others: LyCORIS')
    in `dtype`, a 0-dim float32 .alpha (a conv alpha such as 8/3 stays exact), and ss_* metadata (string values).
    Written to a temporary name, then renamed; NaN weights are refused."""
    tensors = {}
    for name, a in adapters.items():
        tensors |= {f"{name}.{part}": t.detach().to("cpu", dtype).contiguous() for part, t in a.tensors().items()}
        tensors[f"{name}.alpha"] = torch.tensor(float(a.alpha))
    check_finite(tensors, dst)
    with atomic_file(dst, overwrite=True) as tmp:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in metadata.items()})


def kohya_metadata(adapters, base_version, output_name, factor=-1, **extra):
    """The ss_* fields kohya writes and AUTOMATIC1111 reads (it files an adapter under SDXL when
    ss_base_model_version starts with "sdxl_"); a LyCORIS kind as its kohya network writes it (lycoris.kohya,
    algo, dora_wd, factor)."""
    kernel = lambda a: math.prod(a.shape[2:])  # 1 for Linear and 1x1 convs
    linear = next((a for a in adapters.values() if kernel(a) == 1), None)
    conv = next((a for a in adapters.values() if kernel(a) > 1), None)
    linear = linear or conv  # only 3x3 convolutions chosen: their rank is the network's
    kind = next(kind for kind, cls in ADAPTERS.items() if type(linear) is cls)
    args = {"conv_dim": str(conv.rank), "conv_alpha": str(conv.alpha)} if conv else {}
    if kind != "lora":
        args = {"algo": "lora" if kind == "dora" else kind} | args | (
            {"dora_wd": "True"} if kind == "dora" else {"factor": str(factor)} if kind == "lokr" else {})
    meta = {"ss_network_module": "networks.lora" if kind == "lora" else "lycoris.kohya", "ss_network_dim": linear.rank,
            "ss_network_alpha": linear.alpha, "ss_base_model_version": base_version, "ss_output_name": output_name,
            "ss_v2": False, "ss_network_args": json.dumps(args)}
    return meta | {f"ss_{k}": v for k, v in extra.items()}
