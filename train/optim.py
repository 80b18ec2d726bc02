"""The optimizer of a DreamBooth run (train/dreambooth.py) and its learning-rate schedule (lr_scheduler:
warmup, then constant, linear or cosine), the optimizer from four config fields:

    optimizer       "adamw" (torch.optim.AdamW) or "adafactor" (torch.optim.Adafactor: factored second moments,
                    no first moment, so its state is a few MB instead of 8 bytes per weight)
    parallel        "ddp": every process holds the whole optimizer state; "zero": each holds 1/N of it
                    (torch's ZeroRedundancyOptimizer, Rajbhandari et al. 2020), the weights are still all-reduced;
                    "fsdp": each holds 1/N of the UNet's weights, gradients and AdamW moments (FSDP2's fully_shard,
                    Zhao et al. 2023): a block's weights are gathered just before it runs and dropped after
    fused_backward  step each tensor inside backward as soon as its gradient is ready, then free that gradient,
                    so at most a few tensors' gradients exist at once (kohya's --fused_backward_pass)
    master_dtype    "fp32", or "bf16": the trained weights themselves are bfloat16, 2 bytes each instead of 4

bf16 weights are stepped in float32, one tensor at a time (its moments are float32 too), and rounded back
stochastically: up with probability equal to the fraction the rounding drops, so the rounding is unbiased
(E[round(w)] = w) and an update smaller than half a bf16 ulp still moves the weight on average, where
round-to-nearest would drop it every time. We pick this over a compensated (Kahan) update because it needs no
extra buffer: Kahan keeps a bf16 compensation per weight, 2 more bytes per weight, and the 2.6 B-weight UNet
has no 5 GB to spare on a 24 GB card. (Zamirai et al. 2020 compare the two; both track float32 closely.)
"""

import math

import numpy as np
import torch
import torch.distributed as dist

from models.unet import TransformerBlock, UNet


def param_groups(config, named):
    """What the optimizer steps: the tensors of `named` ([(name, tensor)]), or with loraplus_lr_ratio (LoRA+,
    Hayou et al. 2024) two groups, the adapters' up (B) weights apart at lr * the ratio."""
    if not config.loraplus_lr_ratio:
        return [p for _, p in named]
    up = [p for n, p in named if n.endswith(".up.weight")]
    return [{"params": [p for n, p in named if not n.endswith(".up.weight")]},
            {"params": up, "lr": config.lr * config.loraplus_lr_ratio}]


def make_optimizer(config, params):
    """The run's optimizer over `params` (a list of tensors, or param_groups' groups), as the four fields above ask."""
    if config.optimizer == "adamw":
        kind, options = torch.optim.AdamW, dict(lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay)
    else:  # torch's Adafactor: a step is lr * max(1e-3, RMS(w)) * the normalised update (relative step size)
        kind, options = torch.optim.Adafactor, dict(lr=config.lr, weight_decay=config.weight_decay)
    if config.fused_backward or config.master_dtype == "bf16":
        return PerTensor(params, lambda p: kind([p], **options), config.seed)
    if config.parallel == "zero" and dist.is_initialized():  # one process has nothing to shard
        # Imported here: torch.distributed.optim pulls in FSDP and DTensor, ~2 s that every other run would pay.
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=kind, **options)
    return kind(params, **options)


def make_optimization(config, named, process):
    """The optimizer of the trained [(name, tensor)] (param_groups), fused into backward where asked; its lr
    scheduler; fp16's grad scaler."""
    optimizer = make_optimizer(config, param_groups(config, named))
    if config.fused_backward:
        fuse_into_backward(optimizer, config.max_grad_norm, process.world)
    scaler = torch.amp.GradScaler(process.device.type, enabled=config.mixed_precision == "fp16")
    return optimizer, lr_scheduler(config, optimizer), scaler


def lr_factor(config, step):
    """Linear warmup over warmup_steps, then constant, linear decay or cosine decay to 0 at max_steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return {"constant": 1.0, "linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[config.lr_schedule]


def lr_scheduler(config, optimizer):
    """The learning rate of every step: lr x lr_factor (stepped once per optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step))


def fsdp_units(unet):
    """The modules parallel=fsdp shards one by one, innermost first: every transformer block (~35 M weights at
    full size), every UNet block (the rest of it: ResBlocks, projections), then the UNet (embeddings, output).
    Beside its 1/N a process holds the running unit's weights whole, the next one's (prefetched) and the UNet's own
    few (7 M), so the finer the units, the less: the largest full-size block whole would be 413 M weights, 1.5 GiB."""
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    layers = [m for block in blocks for m in block.modules() if isinstance(m, TransformerBlock)]
    return layers + blocks + [unet]


def shard_unet(unet):
    """parallel=fsdp: each of fsdp_units() becomes an FSDP2 unit. The parameters are replaced by DTensors holding
    this process's 1/N (dim 0); forward and backward gather one unit at a time, and backward reduce-scatters
    (averages) the gradients, as DDP's all-reduce would."""
    from torch.distributed.fsdp import fully_shard  # imported here: ~2 s that runs without FSDP need not pay

    for unit in fsdp_units(unet):
        fully_shard(unit)


def gathered(tensor, keep=True):
    """A tensor whole: an FSDP shard (DTensor) is gathered from every process, so every process must call this
    in the same order, and is returned on the CPU, or None where keep is False (only process 0 writes files)."""
    if not hasattr(tensor, "full_tensor"):
        return tensor
    whole = tensor.full_tensor()
    return whole.cpu() if keep else None


def sharded_like(tensor, like):
    """A whole tensor (from a checkpoint) as `like` holds it: this process's shard where `like` is a DTensor."""
    if not hasattr(like, "device_mesh"):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements)


def unsharded_unet(unet, keep):
    """The trained UNet as a plain module with whole weights on the CPU, for the export (every process takes part
    in the gathering; where keep is False, None)."""
    weights = {name: gathered(t.detach(), keep) for name, t in unet.state_dict().items()}
    if not keep:
        return None
    with torch.device("meta"):
        plain = UNet(unet.config)
    plain.load_state_dict(weights, assign=True)
    plain.gradient_checkpointing = unet.gradient_checkpointing
    return plain


class PerTensor(torch.optim.Optimizer):
    """One inner optimizer per trained tensor, stepped one tensor at a time: after backward (step()), or inside
    it from a gradient hook (fused_backward, see fuse_into_backward). A bfloat16 tensor steps a float32 copy
    made for that step only, then is written back with stochastic rounding.

    Its param_groups are the inner optimizers' own group dicts, so the lr schedule reaches every one, and its
    state_dict has the layout of a single optimizer with one group per tensor (what train/checkpoint.py saves)."""

    def __init__(self, weights, make, seed):
        self.weights = list(weights)
        # A float32 weight steps itself; a bf16 one steps a float32 stand-in whose storage exists only during its step.
        self.masters = [w if w.dtype == torch.float32 else torch.nn.Parameter(torch.empty(0, device=w.device))
                        for w in self.weights]
        self.inner = [make(m) for m in self.masters]
        self.param_groups = [o.param_groups[0] for o in self.inner]
        self.defaults, self.state = self.inner[0].defaults, {}
        self.seed = seed
        self.fused = False
        self.sum_of_squares, self.all_finite = 0.0, True  # of this step's gradients, for fused_backward's log

    def step_tensor(self, i):
        """Step weight i with its gradient, then free the gradient."""
        w, master, inner = self.weights[i], self.masters[i], self.inner[i]
        if master is w:
            inner.step()
        else:
            master.data, master.grad = w.detach().float(), w.grad.float()
            inner.step()
            step = int(inner.state[master]["step"])  # restored on resume: the rounding noise is too
            w.data.copy_(stochastic_round(master.data, rounding_generator(self.seed, i, step, w.device)))
            master.data, master.grad = torch.empty(0, device=w.device), None
        w.grad = None

    def step(self, closure=None):
        if not self.fused:  # fused: every tensor already stepped during backward
            for i, w in enumerate(self.weights):
                if w.grad is not None:
                    self.step_tensor(i)

    def zero_grad(self, set_to_none=True):
        for w in self.weights:
            w.grad = None

    def state_dict(self):
        state, groups = {}, []
        for i, inner in enumerate(self.inner):
            own = inner.state_dict()
            if 0 in own["state"]:
                state[i] = own["state"][0]
            groups.append({**own["param_groups"][0], "params": [i]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        for i, inner in enumerate(self.inner):
            group = {**state_dict["param_groups"][i], "params": [0]}
            inner.load_state_dict({"state": {0: state_dict["state"][i]} if i in state_dict["state"] else {},
                                   "param_groups": [group]})
        self.param_groups = [o.param_groups[0] for o in self.inner]


def fuse_into_backward(optimizer, max_grad_norm, world):
    """fused_backward: step each tensor from a hook that runs as soon as backward has accumulated its gradient.
    With several processes (no DDP wrapper then) the hook averages the gradient over them first, as DDP's
    all-reduce would have, so every process takes the same step. A global gradient norm needs every gradient before
    the first step, so max_grad_norm clips each tensor's gradient by its own norm instead (as kohya does); a
    non-finite gradient is not stepped, and the loop stops the run."""
    optimizer.fused = True

    def hook(i):
        def after_accumulate(w):
            if world > 1:
                w.grad.div_(world)
                dist.all_reduce(w.grad)  # the sum of the averages: the global mean, as DDP's all-reduce
            squares = float(w.grad.float().square().sum())
            optimizer.sum_of_squares += squares
            if not math.isfinite(squares):
                optimizer.all_finite, w.grad = False, None
                return
            torch.nn.utils.clip_grad_norm_([w], max_grad_norm)
            optimizer.step_tensor(i)
        return after_accumulate

    for i, w in enumerate(optimizer.weights):
        w.register_post_accumulate_grad_hook(hook(i))


def clip_gradients(config, optimizer, scaler, params, fsdp):
    """Clip the gradients to max_grad_norm (unscaled first under fp16) -> their norm before clipping, the same on
    every process. fused_backward stepped already, each tensor clipped by its own norm: their norm then."""
    if config.fused_backward:
        return fused_grad_norm(optimizer)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    return grad_norm.full_tensor() if fsdp else grad_norm  # FSDP: over every process's shards


def fused_grad_norm(optimizer):
    """The global norm of the gradients the hooks saw this step (inf if one was not finite); resets the count."""
    norm = math.sqrt(optimizer.sum_of_squares) if optimizer.all_finite else math.inf
    optimizer.sum_of_squares, optimizer.all_finite = 0.0, True
    return torch.tensor(norm)


def stochastic_round(x, generator):
    """float32 -> bfloat16, rounding up (away from zero) with probability equal to the dropped fraction.

    bf16 is float32's upper 16 bits: add uniform noise to the lower 16 and truncate them. A carry into bit 16
    happens with probability (lower 16 bits) / 2**16, exactly the fraction truncation would drop."""
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    truncated = (x.contiguous().view(torch.int32) + noise) & -65536  # -65536 = 0xFFFF0000
    return truncated.view(torch.float32).to(torch.bfloat16)  # exact: the dropped bits are zero


def rounding_generator(seed, index, step, device):
    """The generator of tensor `index`'s rounding noise at its optimizer step `step`: the same on every process
    and again after a resume."""
    state = np.random.SeedSequence([seed, index, step, 7]).generate_state(2, dtype=np.uint64)
    return torch.Generator(device).manual_seed(int(state[0] % (2**63)))


def optimizer_problem(config):
    """What is wrong with the optimizer, precision and sharding fields together, in one sentence with the fix, or
    None (TrainConfig.__post_init__ raises it as a ConfigError)."""
    if config.fused_backward and config.grad_accum > 1:
        return ("fused_backward steps each tensor during backward, so gradients cannot accumulate; "
                          "set grad_accum=1 (a larger batch_size instead), or fused_backward=False")
    if config.fused_backward and config.mixed_precision == "fp16":
        return ("fused_backward cannot use fp16's grad scaler (it must see every gradient before a "
                          "step); use mixed_precision=bf16")
    if config.master_dtype == "bf16" and config.mixed_precision != "bf16":
        return ("master_dtype=bf16 needs mixed_precision=bf16 (autocast runs the bf16 weights)")
    if config.parallel == "zero" and (config.fused_backward or config.master_dtype == "bf16"):
        return ("parallel=zero shards one optimizer over the processes; fused_backward and "
                          "master_dtype=bf16 step tensor by tensor: use parallel=ddp with them")
    if config.parallel == "fsdp" and (config.optimizer != "adamw" or config.fused_backward or config.master_dtype == "bf16"
                                    or config.lora_rank or config.train != ["unet"]):
        return ("parallel=fsdp shards a full fine-tuning of the UNet (train=['unet']) with plain AdamW; "
                          "Adafactor, fused_backward, master_dtype=bf16 and LoRA are not supported with it here: "
                          "use parallel=zero or ddp with them")
    if config.loraplus_lr_ratio and (config.fused_backward or config.master_dtype == "bf16" or
                                     config.lora_type not in ("lora", "dora")):
        return ("loraplus_lr_ratio gives LoRA's and DoRA's up weights their own lr, in one optimizer: not "
                          "with fused_backward, master_dtype=bf16, or lora_type loha / lokr (they have no up weights)")
    if config.parallel == "fsdp" and config.mixed_precision == "fp16":
        # GradScaler's overflow check would see each process's shard only: processes could disagree on a skip.
        return ("parallel=fsdp needs mixed_precision=bf16 or no (fp16's grad scaler would check each "
                          "process's shard of the gradients alone)")
    return None
