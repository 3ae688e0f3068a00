"""One optimisation step, as every training script takes it and as memory.py estimates it:

  train_step(net, model, optimizer, loss_fn, batch, step, device, ...) -> (loss, grad_norm, logs, flags)

made of: micro-batches whose gradients add up, bf16 autocast on CUDA, gradient clipping, AdamW (`make_optimizer`), the
EMA (`update_ema`), the end of the step for modules that count steps (`end_step`: the VQ's idle counters), and the
flags the host reads a step later (`copy_to_host`). `checkpoint_blocks` is the activation checkpointing a plan may ask
for. training.py runs these steps in a loop; memory.py runs them on fake tensors to find their peak memory.
"""
import contextlib
import functools

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn

from utils import autocast


def checkpoint_blocks(model):
    """Activation checkpointing, in place, for every block of every nn.ModuleList (the transformer blocks): a block
    keeps only its input for backward and runs its forward again there, trading about a third more compute for the
    activations inside it. Parameters and their names are untouched, so saved models do not change."""
    for blocks in (m for m in model.modules() if isinstance(m, nn.ModuleList)):
        for block in blocks:
            block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


def all_reduce_max(tensor):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)


def make_optimizer(model, lr, fused=None):
    """The AdamW of every training script. Fused on CUDA (the default there): one kernel for all parameters, which
    also skips the update on a flag that stays on the device (train_step). On CPU the fused kernel is about 3x
    slower than the default one for the tiny models, and reading a flag costs nothing."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01,
                             fused=params[0].is_cuda if fused is None else fused)


@torch.no_grad()
def update_ema(ema, model, weight):
    """ema <- ema + weight * (model - ema), for all parameters in one foreach call (a handful of kernels, not one per
    tensor); weight a float or a 0-dim tensor on the device (given once per tensor: as a scalar it would be read on
    the host)."""
    targets = list(ema.parameters())
    weights = [weight] * len(targets) if torch.is_tensor(weight) else weight
    torch._foreach_lerp_(targets, list(model.parameters()), weights)


def end_step(model):
    """Tell the modules that count optimisation steps (vae.VectorQuantizer: idle codes, dead-code restart) that one
    ended: once per step, however many micro-batches made it."""
    for module in model.modules():
        if hasattr(module, "end_step"):
            module.end_step()


def train_step(net, model, optimizer, loss_fn, batch, step, device, ema=None, ema_decay=None, poisoned=False,
               stop=False, micro_batches=1, precision=None):
    """One optimisation step that never makes the host wait for the device -> (loss, grad_norm, logs, flags).

    The batch is cut into micro_batches equal micro-batches, each run forward (under `precision`, by default bf16
    autocast on CUDA) and backward with its loss divided by their number: the gradients add up to those of the
    whole batch's mean loss, so the update does not depend on the cut (terms computed over a batch, such as the
    LAM's code usage, are then computed per micro-batch). Under DDP only the last backward averages the gradients
    over processes. Then gradient clipping at 1, AdamW, EMA, end_step. flags (2,) float on the device: [the loss or
    the gradient was not finite, some process asked to stop (stop is this one's answer)], the maximum over processes
    under torchrun. A non-finite step is skipped on the device: the fused AdamW leaves weights, moments and its step
    count alone when its found_inf is 1, and the EMA moves by 0 (a non-fused AdamW, as on CPU, is skipped by the
    host, for which the flag is at hand). The host reads the flags later (train_loop, one step behind), so it keeps
    queueing work while the device computes. poisoned makes the loss NaN (a test's fault).
    """
    optimizer.zero_grad(set_to_none=True)
    losses, logs = [], []
    for k, micro in enumerate(zip(*(v.chunk(micro_batches) for v in batch.values()))):
        last = k == micro_batches - 1
        with (contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()), \
                (precision or (lambda: autocast(device)))():
            loss, micro_logs = loss_fn(net, dict(zip(batch, micro)), step)
        if poisoned:
            loss = loss * float("nan")
        (loss / micro_batches).backward()
        losses.append(loss.detach())
        logs.append(micro_logs)
    loss = torch.stack(losses).mean()
    logs = {key: torch.stack([l[key] for l in logs]).mean(0) if torch.is_tensor(value) else value
            for key, value in logs[-1].items()}
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    flags = torch.stack([~(torch.isfinite(loss) & torch.isfinite(grad_norm)),
                         torch.full((), stop, device=device)]).float()  # full: a fill kernel, no copy from the host
    all_reduce_max(flags)
    if optimizer.defaults["fused"]:
        optimizer.found_inf = flags[0]
        optimizer.step()
    elif not flags[0]:
        optimizer.step()
    if ema is not None:
        update_ema(ema, model, (1 - ema_decay) * (1 - flags[0]))
    end_step(model)
    return loss, grad_norm, logs, flags


def copy_to_host(tensor):
    """Start copying a device tensor to the host without waiting -> read(), which returns it as a list when called
    (on CUDA it waits for the copy, long done if called a step later). The copy and its event go on the tensor's own
    device's stream, whichever device is current."""
    if tensor.device.type != "cuda":
        return tensor.tolist
    with torch.cuda.device(tensor.device):
        host = tensor.to("cpu", non_blocking=True)  # into pinned memory
        done = torch.cuda.Event()
        done.record()
    return lambda: (done.synchronize(), host.tolist())[1]
