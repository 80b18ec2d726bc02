"""VAE decodes and encodes of large images in overlapping, cross-faded tiles (Pipeline.vae_tiling, --vae-tiling):
the memory of one tile instead of the whole image, nearly the same pixels."""

import torch


def tiled(fn, x, tile, factor):
    """fn over overlapping tile x tile windows of x (B, C, H, W), blended: fn's outputs (one tensor or a tuple,
    each (B, C', H * factor, W * factor)) as one. Neighbouring tiles overlap by a quarter of a tile and are
    cross-faded with linear ramps there, so no seam shows (every point's weights sum to 1 whatever the overlap:
    a pointwise fn comes out exactly as untiled). Not exact: the VAE's mid-block attention sees one
    tile instead of the whole image, and its GroupNorms take one tile's statistics (as diffusers' tiled VAE):
    the bigger the tile, the closer to the whole. tests/test_fast_paths.py measures it."""
    overlap = tile // 4
    H, W = x.shape[-2:]

    unit = round(1 / factor) if factor < 1 else 1  # an encode's tiles start on whole latents (8 pixels)

    def starts(size):
        if size <= tile:
            return [0]
        return [s - s % unit for s in range(0, size - tile, tile - overlap)] + [size - tile]

    def ramp(start, length, size):  # (length * factor,) weights: rising over an overlap shared with a neighbour
        n, ov = round(length * factor), round(overlap * factor)
        w = torch.ones(n)
        if start > 0:
            w[:ov] = torch.linspace(1, ov, ov) / (ov + 1)
        if start + length < size:
            w[n - ov:] = torch.linspace(ov, 1, ov) / (ov + 1)
        return w

    total = weight = None
    for top in starts(H):
        for left in starts(W):
            h, w = min(tile, H), min(tile, W)
            out = fn(x[..., top:top + h, left:left + w])
            out = out if isinstance(out, tuple) else (out,)
            mask = (ramp(top, h, H)[:, None] * ramp(left, w, W)[None, :]).to(x.device)  # (h * f, w * f)
            if total is None:
                total = [o.new_zeros(*o.shape[:2], round(H * factor), round(W * factor)) for o in out]
                weight = torch.zeros(round(H * factor), round(W * factor), device=x.device)
            row, col = round(top * factor), round(left * factor)  # where the tile's output goes
            for acc, o in zip(total, out):
                acc[..., row:row + o.shape[-2], col:col + o.shape[-1]] += o * mask.to(o.dtype)
            weight[row:row + mask.shape[0], col:col + mask.shape[1]] += mask
    blended = tuple(acc / weight.to(acc.dtype) for acc in total)
    return blended if len(blended) > 1 else blended[0]
