"""LyCORIS adapters (KohakuBlueleaf's lycoris-lora) merged into a weight: the weight each one's forward pass
computes, W -> W', in float32. models/lora.py reads the files (kohya's names) and calls `merged_weight`.

    kind     tensors per module (+ `alpha`)                          W' (m = the --lora scale, s = alpha / rank)
    LoRA     lora_down, lora_up [, lora_mid: Tucker]                 W + m s up @ down
    LoHa     hada_w1_a/b, hada_w2_a/b [, hada_t1/t2: Tucker]         W + m s (w1a @ w1b) * (w2a @ w2b)
    LoKr     lokr_w1 | lokr_w1_a/b, lokr_w2 | lokr_w2_a/b [, t2]     W + m s kron(W1, W2)   (s = 1 if no factor is split)
    DoRA     any of the three + dora_scale (or PEFT's                V = W + s dW; W' = V (m (g / |V| - 1) + 1), |V| per
             lora_magnitude_vector)                                  output row (or input column, by g's shape)
    OFT      oft_blocks (n, b, b) [, rescale]                        blockdiag(R)^T W, R = Cayley(B - B^T) mixed with I by m
    BOFT     oft_blocks (stages, n, b, b) [, rescale]                butterfly products of such blocks
    IA3      weight, on_input                                        W * (1 + m w) on output rows (input columns)
    Full     diff [, diff_b]                                         W + m diff, b + m diff_b

These follow the package's forward pass (modules/*.py of lycoris-lora 4.1.3), which is what an adapter was
trained with and what ComfyUI and AUTOMATIC1111 apply. Its merge functions (get_merged_weight, merge_to) apply
alpha / rank twice for LoHa and LoKr; we do not follow them. tests/test_lycoris.py compares each kind with the
package's modules.
"""

import torch

PARTS = {  # tensor-name ending -> (kind, part); models/lora.py matches the longest ending first
    ".hada_w1_a": ("LoHa", "w1a"), ".hada_w1_b": ("LoHa", "w1b"), ".hada_w2_a": ("LoHa", "w2a"),
    ".hada_w2_b": ("LoHa", "w2b"), ".hada_t1": ("LoHa", "t1"), ".hada_t2": ("LoHa", "t2"),
    ".lokr_w1": ("LoKr", "w1"), ".lokr_w1_a": ("LoKr", "w1a"), ".lokr_w1_b": ("LoKr", "w1b"),
    ".lokr_w2": ("LoKr", "w2"), ".lokr_w2_a": ("LoKr", "w2a"), ".lokr_w2_b": ("LoKr", "w2b"), ".lokr_t2": ("LoKr", "t2"),
    ".lora_mid.weight": ("LoRA", "mid"), ".dora_scale": (None, "dora_scale"),
    ".lora_magnitude_vector": (None, "magnitude"), ".lora_magnitude_vector.weight": (None, "magnitude"),
    ".oft_blocks": ("OFT", "blocks"), ".rescale": (None, "rescale"),
    ".on_input": ("IA3", "on_input"), ".diff": ("Full", "diff"), ".diff_b": ("Full", "diff_b"),
}
UNSUPPORTED = {".a1.weight": "GLoRA", ".b2.weight": "GLoRA", ".w_norm": "Norm (LyCORIS' norm-layer adapter)",
               ".b_norm": "Norm (LyCORIS' norm-layer adapter)", ".lambda_layer": "TLoRA", ".oft_diag": "OFT (kohya's)"}


def tucker(core, a, b):
    """A Tucker core (R, R, k, k) with factors a (R, out), b (R, in) -> (out, in, k, k)."""
    return torch.einsum("i j k l, i p, j r -> p r k l", core, a, b)


def lora_delta(p, shape):
    """LoRA / LoCon: up @ down (through the Tucker core if there is one), unscaled; rank."""
    up, down = p["up"].flatten(1), p["down"]
    if "mid" in p:  # down (R, in, 1, 1), mid (R, R, k, k), up (out, R, 1, 1)
        return tucker(p["mid"], up.T, down.flatten(1)).reshape(shape), down.shape[0]
    return (up @ down.flatten(1)).reshape(shape), down.shape[0]


def loha_delta(p, shape):
    """LoHa (Hadamard product of two low-rank products), unscaled; rank."""
    if "t1" in p:  # w*_a (R, out), w*_b (R, in), t* (R, R, k, k)
        return tucker(p["t1"], p["w1a"], p["w1b"]) * tucker(p["t2"], p["w2a"], p["w2b"]), p["w1b"].shape[0]
    first, second = p["w1a"] @ p["w1b"].flatten(1), p["w2a"] @ p["w2b"].flatten(1)  # (out, in * k * k) each
    return (first * second).reshape(shape), p["w1b"].shape[0]


def lokr_delta(p, shape):
    """LoKr: kron(W1, W2), W1 (a, c) the small factor, W2 (b, d[, k, k]); rank of a split factor, else None."""
    w1 = p["w1"] if "w1" in p else p["w1a"] @ p["w1b"]
    if "t2" in p:  # w2a (R, b), w2b (R, d), t2 (R, R, k, k)
        w2 = tucker(p["t2"], p["w2a"], p["w2b"])
    elif "w2" in p:
        w2 = p["w2"]
    else:
        w2 = p["w2a"] @ p["w2b"].flatten(1)
    if len(shape) == 4:  # (a, c, 1, 1) kron (b, d, k, k) -> (a b, c d, k, k)
        w1, w2 = w1[:, :, None, None], w2.reshape(shape[0] // w1.shape[0], shape[1] // w1.shape[1], *shape[2:])
    rank = p["t2"].shape[0] if "t2" in p else p["w2b"].shape[0] if "w2b" in p else p["w1b"].shape[0] if "w1b" in p else None
    return torch.kron(w1.contiguous(), w2.contiguous()).reshape(shape), rank  # (kron needs contiguous factors)


def weight_decompose(weight, delta, magnitude, scale):
    """DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353) as LyCORIS' forward computes it: V = W + dW, the
    magnitude g over |V| per output row (g (out, 1, ...)) or per input column (g (1, in, ...)), and the
    --lora scale m mixing that factor with 1."""
    merged = weight + delta
    dims = [d for d in range(merged.ndim) if magnitude.shape[d] == 1]  # the norm runs over g's size-1 dims
    norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True) + torch.finfo(torch.float32).eps
    return merged * (scale * (magnitude / norm - 1) + 1)


def cayley(blocks, constraint):
    """Orthogonal blocks (n, b, b) from free ones: Q = B - B^T, its Frobenius norm (all blocks) capped at
    `constraint` (0: no cap), R = (I + Q)(I - Q)^-1 (Qiu et al. 2023, https://arxiv.org/abs/2306.07280)."""
    q = blocks - blocks.transpose(-1, -2)
    norm = q.norm()
    if constraint > 0 and norm > constraint:
        q = q * (constraint / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def oft_weight(weight, p, scale):
    """OFT: output rows in groups of b, each group turned by its block R^T; BOFT (Liu et al. 2023,
    https://arxiv.org/abs/2311.06243): stage i pairs rows 2^i b / 2 apart (a butterfly) before its blocks."""
    out = weight.shape[0]
    constraint = float(p.get("alpha", 0.0)) * out  # LyCORIS stores the constraint per output row
    rotations = cayley(p["blocks"], constraint)
    eye = torch.eye(rotations.shape[-1], dtype=rotations.dtype)
    rotations = scale * rotations + (1 - scale) * eye  # the --lora scale mixes each rotation with the identity
    rest = weight.shape[1:]
    if rotations.ndim == 3:  # OFT: (n, b, b); W'[k b + m] = sum_n R_k[n, m] W[k b + n]
        n, b, _ = rotations.shape
        turned = torch.einsum("k n m, k n r -> k m r", rotations, weight.reshape(n, b, -1))
    else:  # BOFT: (stages, n, b, b); stage i interleaves the two halves of each group of 2 k rows, k = 2^i b / 2
        turned = weight.reshape(out, -1)
        stages, n, b, _ = rotations.shape
        for i in range(stages):
            k = 2**i * b // 2
            paired = turned.reshape(out // (2 * k), 2, k, -1).transpose(1, 2).reshape(n, b, -1)  # row c 2k + 2t + g
            paired = torch.einsum("k i j, k j r -> k i r", rotations[i], paired)
            turned = paired.reshape(out // (2 * k), k, 2, -1).transpose(1, 2).reshape(out, -1)  # back to c 2k + g k + t
    turned = turned.reshape(out, *rest)
    return turned * p["rescale"].reshape(out, *[1] * len(rest)) if "rescale" in p else turned


def merged_weight(kind, p, weight, scale):
    """The weight W' (float32, W's shape) one module of a LyCORIS file gives at the --lora scale m = `scale`.
    p: the module's tensors by part name (PARTS), float32; weight: W, float32."""
    shape = weight.shape
    if kind == "IA3":  # weight (out,) or (in,) (conv: (1, c, 1, 1)), on_input 0 or 1
        axis = 1 if int(p["on_input"]) else 0
        w = p["ia3"].reshape([-1 if d == axis else 1 for d in range(weight.ndim)])
        return weight * (1 + scale * w)
    if kind == "Full":
        return weight + scale * p["diff"].reshape(shape)
    if kind in ("OFT", "BOFT"):
        return oft_weight(weight, p, scale)
    delta, rank = {"LoRA": lora_delta, "LoHa": loha_delta, "LoKr": lokr_delta}[kind](p, shape)
    s = float(p["alpha"]) / rank if "alpha" in p and rank is not None else 1.0
    if "magnitude" in p:  # PEFT's DoRA: |W + m s dW| per output row, the --lora scale inside the delta
        merged = weight + scale * s * delta
        norm = merged.reshape(shape[0], -1).norm(dim=1).reshape(-1, *[1] * (len(shape) - 1))
        return merged * (p["magnitude"].reshape(norm.shape) / norm)
    if "dora_scale" in p:
        magnitude = p["dora_scale"]  # (out, 1, ...) or (1, in, ...) as LyCORIS saves it; a bare (out,) per output row
        if magnitude.shape[0] == shape[0]:
            magnitude = magnitude.reshape(-1, *[1] * (len(shape) - 1))
        return weight_decompose(weight, s * delta, magnitude, scale)
    return weight + scale * s * delta
