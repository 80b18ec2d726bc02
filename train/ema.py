"""An exponential moving average of the trained weights (ema_decay, ema_every; beyond kohya): a float32 shadow of
every trained tensor, updated after the optimizer step every ema_every steps,

    shadow = decay * shadow + (1 - decay) * weight        (torch.lerp, in float32 whatever the weights' dtype)

saved in each checkpoint (so a resume is bit-exact), and swapped into the model for the validation images, the
validation loss and the export (ema_export: "beside" writes it next to the trained weights, "model" instead of
them). It is sharded as the run shards its memory:

    ddp    every process keeps the whole shadow, as it keeps the whole weights
    zero   process r keeps the shadow of trained tensors r, r + N, r + 2N, ... (N processes); the whole of one is
           broadcast from its keeper when a checkpoint, a validation or the export needs it
    fsdp   each process keeps the shards of its own weights (DTensors), gathered as the weights are

Every function that needs the whole shadow is a collective under zero and fsdp: every process calls it, in order.
"""

from contextlib import contextmanager

import torch
import torch.distributed as dist

from train.optim import gathered, sharded_like


class EMA:
    def __init__(self, named, decay, every, shard=None):
        """shard: (rank, processes) under parallel=zero, else None."""
        self.named, self.decay, self.every, self.shard = list(named), decay, every, shard
        self.shadow = [p.detach().float().clone() if self.keeps(i) else None for i, (_, p) in enumerate(self.named)]

    def keeps(self, i):
        return self.shard is None or i % self.shard[1] == self.shard[0]

    @property
    def sharded(self):
        return self.shard is not None or any(hasattr(s, "full_tensor") for s in self.shadow if s is not None)

    @torch.no_grad()
    def update(self, step):
        if step % self.every == 0:
            for shadow, (_, p) in zip(self.shadow, self.named):
                if shadow is not None:
                    shadow.lerp_(p.detach().float(), 1 - self.decay)

    def whole(self, keep):
        """{name: the whole shadow} where keep (None elsewhere): a collective under zero and fsdp."""
        out = {}
        for i, ((name, p), shadow) in enumerate(zip(self.named, self.shadow)):
            if self.shard is not None:  # broadcast from the process that keeps it
                buffer = shadow if shadow is not None else torch.empty(p.shape, dtype=torch.float32, device=p.device)
                dist.broadcast(buffer, src=i % self.shard[1])
                out[name] = buffer if keep else None
            else:
                out[name] = gathered(shadow.detach(), keep)
        return out

    @torch.no_grad()
    def load(self, tensors):
        """The shadow from a checkpoint's {name: whole tensor} (the part this process keeps); ValueError if one is
        missing (a checkpoint made without EMA)."""
        missing = [name for name, _ in self.named if name not in tensors]
        if missing:
            raise ValueError(f"the checkpoint holds no EMA of {missing[0]} (it was made without ema_decay); resume "
                             "with the config it was made with")
        for shadow, (name, _) in zip(self.shadow, self.named):
            if shadow is not None:
                shadow.copy_(sharded_like(tensors[name], shadow))

    def unshard(self, model, keep):
        """Before the export: the shadow whole where keep (a collective), then bound to `model`'s parameters of the
        same names (under fsdp, the unsharded UNet's) -> a function that binds it."""
        whole = self.whole(keep)
        return lambda: self.bind(model, whole)

    def bind(self, model, whole):
        if any(hasattr(s, "full_tensor") for s in self.shadow):  # fsdp: the unsharded UNet has new parameters
            params = dict(model.named_parameters())
            self.named = [(name, params[name]) for name, _ in self.named]
        self.shadow, self.shard = [whole[name] for name, _ in self.named], None

    @contextmanager
    def swapped(self):
        """Inside, the trained tensors hold the EMA weights (cast to their dtype); after, their own again. Under zero
        every process takes part (each gets the whole shadow for the moment)."""
        saved = [p.detach().clone() for _, p in self.named]
        whole = self.whole(keep=True) if self.shard is not None else None
        with torch.no_grad():
            for shadow, (name, p) in zip(self.shadow, self.named):
                p.copy_(whole[name] if whole is not None else shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for own, (_, p) in zip(saved, self.named):
                    p.copy_(own)


def make_ema(config, named, process):
    """The run's EMA of `named` ([(name, tensor)]), or None without ema_decay; under parallel=zero, sharded."""
    if config.ema_decay is None:
        return None
    shard = (process.rank, process.world) if config.parallel == "zero" and process.world > 1 else None
    return EMA(named, config.ema_decay, config.ema_every, shard)
