"""An exponential moving average of the trained weights (ema_decay, ema_every; beyond kohya): a float32 shadow of
every trained tensor, updated after the optimizer step every ema_every steps,

    shadow = decay * shadow + (1 - decay) * weight        (torch.lerp, in float32 whatever the weights' dtype)

saved in each checkpoint (so a resume is bit-exact), and swapped into the model for the validation images, the
validation loss and the export (ema_export: "beside" writes it next to the trained weights, "model" instead of
them). Under parallel=fsdp the shadow is sharded as the weights are (each process keeps its own shards, DTensors,
and the checkpoint and export gather them one tensor at a time); under ddp and zero every process keeps the whole
shadow, as it keeps the whole weights (ZeRO shards the optimizer state, not this).
"""

from contextlib import contextmanager

import torch

from train.optim import gathered, sharded_like


class EMA:
    def __init__(self, named, decay, every):
        self.named, self.decay, self.every = list(named), decay, every
        self.shadow = [p.detach().float().clone() for _, p in self.named]

    @torch.no_grad()
    def update(self, step):
        if step % self.every == 0:
            for shadow, (_, p) in zip(self.shadow, self.named):
                shadow.lerp_(p.detach().float(), 1 - self.decay)

    def state(self):
        """{name: shadow} for the checkpoint."""
        return {name: s for (name, _), s in zip(self.named, self.shadow)}

    @torch.no_grad()
    def load(self, tensors):
        """The shadow from a checkpoint's {name: whole tensor} (this process's shards of it under FSDP); ValueError
        if one is missing (a checkpoint made without EMA)."""
        missing = [name for name, _ in self.named if name not in tensors]
        if missing:
            raise ValueError(f"the checkpoint holds no EMA of {missing[0]} (it was made without ema_decay); resume "
                             "with the config it was made with")
        for shadow, (name, _) in zip(self.shadow, self.named):
            shadow.copy_(sharded_like(tensors[name], shadow))

    def unshard(self, model, keep):
        """Under FSDP, before the export: the shadow gathered whole (every process takes part; kept on the
        process where keep), then bound to `model`'s parameters of the same names (the unsharded UNet's)."""
        whole = [gathered(s.detach(), keep) for s in self.shadow]
        return lambda: self.bind(model, whole)

    def bind(self, model, shadow):
        params = dict(model.named_parameters())
        self.named = [(name, params[name]) for name, _ in self.named]
        self.shadow = shadow

    @contextmanager
    def swapped(self):
        """Inside, the trained tensors hold the EMA weights (cast to their dtype); after, their own again."""
        saved = [p.detach().clone() for _, p in self.named]
        with torch.no_grad():
            for shadow, (_, p) in zip(self.shadow, self.named):
                p.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for own, (_, p) in zip(saved, self.named):
                    p.copy_(own)
