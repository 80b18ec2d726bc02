"""Research instruments: look inside a running generation, or change one module, without editing a file.

Modules are picked by fnmatch patterns over their official names (the checkpoint's, as the trainer's train=):
"unet.middle_block", "unet.output_blocks.*.1" (the output blocks' transformers), "unet.*attn2" (every
cross-attention), "text_encoder_2.*"; a pipeline's ControlNets, T2I-Adapters and IP-Adapters are registered on the
model as "controlnets.0.middle_block_out", "adapters.0.adapter.body.2", "ip_adapters.0.ip_adapter.1" (the image
keys and values of the first cross-attention: its attention maps are over the image tokens). Each instrument is a context manager; leaving it puts the model back as
it was, and with none active nothing in the forward pass is different.

    with tap(pipe.model, "unet.middle_block") as features:   # features[name][step]: the output, on the CPU
        pipe(settings)
    with intervene(pipe.model, "unet.output_blocks.4.1", lambda name, step, out: 0.5 * out):
        pipe(settings)
    with attention_maps(pipe.model) as maps:                  # maps[name][step]: (rows, N, 77) probabilities
        pipe(settings)

A step is the denoising step the UNet is at, from 0: a new one starts when the UNet's timestep changes, so the
two passes of cfg_mode="split" are one step; a module outside the UNet gets the step of the UNet's last call (0
before its first). The count runs on over every generation inside one `with`: enter it per generation to count
from 0 each time. What one module gives during a step is concatenated over the batch: rows [uncond, cond] in
both CFG modes. Examples built on these (FreeU, skipping a block, ...) are in sampling/interventions.py.
"""

from contextlib import ExitStack, contextmanager
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F

from models.layers import softmax_attention


def matching(model, patterns, having=None):
    """[(name, module)] of `model` whose names match a pattern (a string or a list of them), optionally only
    modules with the attribute `having`; ValueError naming the patterns if there is none."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    found = [(name, module) for name, module in model.named_modules()
             if name and any(fnmatchcase(name, p) for p in patterns) and (having is None or hasattr(module, having))]
    if not found:
        kind = "attention module" if having == "attend" else "module"
        raise ValueError(f"{patterns} matches no {kind} of the model; names are the official ones, e.g. "
                         "unet.output_blocks.4.1.transformer_blocks.0.attn2 (list them with model.named_modules())")
    return found


class StepCounter:
    """The denoising step the UNet is at (see the module docstring), kept by a forward pre-hook on it and on the
    ControlNets a pipeline registered on the model (model.controlnets), which run before it in each step."""

    def __init__(self, model):
        self.step, self.timestep = 0, None
        nets = [getattr(model, "unet", model), *getattr(model, "controlnets", ())]
        self.handles = [net.register_forward_pre_hook(self.before_unet) for net in nets]

    def before_unet(self, unet, args):
        t = float(args[1].flatten()[0])  # (B,) timesteps, the same for every row of one step
        if self.timestep is not None and t != self.timestep:
            self.step += 1
        self.timestep = t


def add(records, name, step, tensor):
    """records[name][step] = tensor, or joined on to what the step already gave (cfg_mode split's second pass)."""
    by_step = records.setdefault(name, {})
    by_step[step] = torch.cat([by_step[step], tensor]) if step in by_step else tensor


@contextmanager
def counting_steps(model):
    counter = StepCounter(model)
    try:
        yield counter
    finally:
        for handle in counter.handles:
            handle.remove()


@contextmanager
def tap(model, patterns):
    """Record what the matching modules return: yields {name: {step: output}}, detached, on the CPU. Outputs
    must be tensors (a text encoder's tuple: tap its layers instead)."""
    found, records = matching(model, patterns), {}
    with counting_steps(model) as counter, ExitStack() as hooks:
        for name, module in found:
            record = lambda module, args, output, name=name: add(records, name, counter.step, output.detach().cpu())
            hooks.callback(module.register_forward_hook(record).remove)
        yield records


@contextmanager
def intervene(model, patterns, fn, inputs=False):
    """Change what the matching modules return: their output becomes fn(name, step, output). With inputs=True,
    fn(name, step, args) -> args changes their positional inputs before they run instead (a forward pre-hook)."""
    found = matching(model, patterns)
    with counting_steps(model) as counter, ExitStack() as hooks:
        for name, module in found:
            if inputs:
                change = lambda module, args, name=name: tuple(fn(name, counter.step, args))
                hook = module.register_forward_pre_hook(change)
            else:
                change = lambda module, args, output, name=name: fn(name, counter.step, output)
                hook = module.register_forward_hook(change)
            hooks.callback(hook.remove)
        yield


@contextmanager
def skipped(model, patterns):
    """The matching modules do not run: each returns its first input as it is. (A transformer block adds to its
    input, so skipping it removes exactly what it contributes; an output block's input lacks its skip's channels,
    so skip what is inside it instead.)"""
    found = matching(model, patterns)
    saved = [module.__dict__.get("forward") for _, module in found]  # an enclosing skipped()'s, if any
    try:
        for _, module in found:
            module.forward = lambda x, *args, **kwargs: x  # an instance attribute, in front of the class's forward
        yield
    finally:
        for (_, module), forward in zip(found, saved):
            module.__dict__.pop("forward", None)
            if forward is not None:
                module.forward = forward


@contextmanager
def attention_function(model, patterns, make):
    """Each matching attention module calls make(name) (a function with models.layers.attention's signature)
    instead of its own, e.g. make = lambda name: softmax_attention."""
    found = matching(model, patterns, having="attend")
    saved = [module.attend for _, module in found]
    try:
        for name, module in found:
            module.attend = make(name)
        yield
    finally:
        for (_, module), attend in zip(found, saved):
            module.attend = attend


@contextmanager
def attention_maps(model, patterns="unet.*attn2"):
    """Record the attention probabilities of the matching modules, averaged over heads: yields {name: {step:
    (rows, N queries, M keys)}} in float16 on the CPU. The default is every cross-attention of the UNet (M = 77
    per prompt chunk); a self-attention pattern ("unet.*attn1") records (rows, N, N), N = h * w of its level.
    While recording, those modules run softmax_attention (the probabilities written out, in chunks of queries)
    instead of SDPA, which forms none: equal within float noise, slower. At 1024² all 70 cross-attentions of
    SDXL over 28 steps hold about 0.9 GB per image."""
    maps = {}
    with counting_steps(model) as counter:
        def recording(name):
            def attend(q, k, v, heads, causal=False):
                chunks = []
                out = softmax_attention(q, k, v, heads, causal, record=lambda p, start: chunks.append(p.half().cpu()))
                add(maps, name, counter.step, torch.cat(chunks, dim=1))  # (rows, N, M)
                return out
            return attend

        with attention_function(model, patterns, recording):
            yield maps


def token_heatmaps(maps, height, width, rows=None, pixels_per_latent=8):
    """DAAM (Tang et al. 2022): each key's (prompt token's) attention summed over blocks and steps, each block's
    (rows, h*w, M) map upsampled bicubically to the latent size first -> (rows, M, height, width) at the image
    size, each map scaled to [0, 1] (min to max). rows picks batch rows (e.g. slice(-n, None): the n conditional
    ones); pixels_per_latent: the VAE's (8 for SDXL's)."""
    H, W = height // pixels_per_latent, width // pixels_per_latent  # the latent size, as the pipeline makes it
    total = None
    for by_step in maps.values():
        for probs in by_step.values():
            probs = probs[rows] if rows is not None else probs
            h, w = level_size(H, W, probs.shape[1])
            grid = probs.float().transpose(1, 2).unflatten(2, (h, w))  # (rows, M, h, w)
            grid = F.interpolate(grid, size=(H, W), mode="bicubic", align_corners=False).clamp(min=0)
            total = grid if total is None else total + grid
    total = F.interpolate(total, size=(height, width), mode="bicubic", align_corners=False)
    low, high = (f(total.flatten(2), dim=2)[:, :, None, None] for f in (torch.amin, torch.amax))
    return (total - low) / (high - low).clamp(min=1e-12)  # per token, its least-attended pixel 0, its most 1


def level_size(H, W, tokens):
    """The (h, w) of the UNet level whose h * w is `tokens`, for an H x W latent (each downsampling rounds up)."""
    h, w = H, W
    while h * w > tokens:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != tokens:
        raise ValueError(f"{tokens} queries fit no level of a {H}x{W} latent; pass the generation's height and width")
    return h, w


def prompt_tokens(tokenizer, prompt, truncate=False, weighted=True):
    """The key positions of a prompt's words in its first 77-token chunk, and their text: ([1, 2, ...], ["1girl",
    ...]), BOS (position 0), EOS and padding left out, as sampling/prompts.py tokenizes it."""
    from sampling.prompts import token_chunks

    ids = token_chunks(tokenizer, prompt, truncate, weighted)[0].tolist()
    words = [(i, tokenizer.convert_ids_to_tokens(token).removesuffix("</w>")) for i, token in enumerate(ids)
             if token not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)]
    return [i for i, _ in words], [word for _, word in words]


def heatmap_grid(image, heatmaps, labels, columns=6, min_panel=128):
    """One picture of token heatmaps: the image, then one panel per token, the image under its heatmap (black ->
    red -> yellow -> white), each labelled above. heatmaps (T, H, W) in [0, 1] at the image's size; small images
    are enlarged (nearest) to min_panel pixels so the labels fit."""
    import numpy as np
    from PIL import Image, ImageDraw

    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255  # (H, W, 3)
    heat = heatmaps.float().clamp(0, 1).numpy()[..., None]  # (T, H, W, 1)
    hot = np.concatenate([np.clip(3 * heat - k, 0, 1) for k in range(3)], axis=-1)  # (T, H, W, 3)
    panels = [base] + list(0.35 * base + 0.65 * hot)
    names = ["image"] + list(labels)
    H, W = base.shape[:2]
    zoom = max(1, -(-min_panel // W))
    w, h, strip = W * zoom, H * zoom, 14
    rows = -(-len(panels) // columns)
    sheet = Image.new("RGB", (min(columns, len(panels)) * w, rows * (h + strip)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (pixels, name) in enumerate(zip(panels, names)):
        x, y = (i % columns) * w, (i // columns) * (h + strip)
        panel = Image.fromarray((pixels * 255).round().astype(np.uint8)).resize((w, h), Image.NEAREST)
        sheet.paste(panel, (x, y + strip))
        draw.text((x + 2, y + 1), name[: w // 6], fill="black")  # ~6 px per character of the default font
    return sheet
