"""How much GPU memory one training step takes, found without a GPU, and the step settings that make it fit a card.

  estimate(build, loss_fn, micro_batch, ...)   -> the peak of one optimisation step, with a breakdown
  plan(build, loss_fn, batch, budget, ...)     -> the micro-batch and activation checkpointing that fit `budget`

The estimate runs the real training step (step.train_step: forward, backward, clipping, AdamW, EMA) on fake
tensors (torch's FakeTensorMode: shapes, dtypes and strides, no data, no compute), under bf16 autocast as on CUDA, and
counts the bytes of every storage alive after each operation; the peak of that count over two steps (the second has
the optimiser's moments) is the estimate. The fake tensors live on the CPU, so the attention is CPU's flash kernel,
which saves for backward what CUDA's flash kernel saves (the output and the log-sum-exp, not the attention matrix).
Each storage is rounded up to the 512-byte blocks of the CUDA caching allocator. What it does not count: the CUDA
context and cuBLAS workspaces (outside torch's allocator, about 0.5-1 GB), the allocator's fragmentation, and the
memory of torch.compile's fused kernels, which save less than eager (so compiled runs sit below the estimate), and
under torchrun NCCL's buffers (DDP's gradient buckets are the gradients themselves: gradient_as_bucket_view).
`budget` leaves room for those: a plan fills at most 85 % of the card (68 GB of 80, 34 of 40), and leaves as much of
what is free when the card is shared.
"""
import copy
import math
import warnings
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from step import checkpoint_blocks, make_optimizer, train_step

GB = 1e9
BUDGET_FRACTION = 0.85  # of the card's memory that a plan may fill
BLOCK = 512  # bytes: the CUDA caching allocator's rounding


class PeakMemory(TorchDispatchMode):
    """Counts the bytes of the storages that operations create, while they are alive; `peak` is the most at once."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.track(tensor.untyped_storage())
        return out

    def track(self, storage):
        key = id(storage)
        if key in self.live:
            return
        size = math.ceil(storage.nbytes() / BLOCK) * BLOCK
        self.live[key] = (size, weakref.ref(storage, lambda _, key=key: self.free(key)))
        self.now += size
        self.peak = max(self.peak, self.now)

    def free(self, key):
        size, _ = self.live.pop(key)
        self.now -= size


def estimate(build, loss_fn, micro_batch, micro_batches=1, checkpoint=False, ema=False, device="cpu",
             dtype=torch.bfloat16):
    """Peak memory of one training step of micro_batches micro-batches of `micro_batch` samples.

    build(micro_batch) -> (model, batch) makes the model (at its training config) and a batch of that many samples
    (a dict of tensors); it is called under fake tensors, so it allocates nothing. loss_fn(net, batch, step) as in
    training.train_loop. checkpoint: activation checkpointing per block; ema: an EMA copy of the weights. device:
    where the fake tensors live: cpu on a machine without a GPU, cuda on one with (then the kernels are CUDA's).
    dtype: of the autocast (float32: none, as a CPU trains, to check the estimate against a measured CPU step).
    -> dict of bytes: peak, weights, gradients, optimizer (AdamW moments), ema, activations (the rest of the peak:
    what backward keeps and the temporaries of the step at its peak)."""
    def precision():  # bf16 on the CPU too: the estimate is of a CUDA step
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    device = torch.device(device)
    with FakeTensorMode(allow_non_fake_inputs=True), device, PeakMemory() as tracker, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CPU kernels' notes on bf16 inputs: not what a CUDA step would do
        model, batch = build(micro_batch)
        model.train()
        ema_copy = copy.deepcopy(model).requires_grad_(False) if ema else None
        if checkpoint:
            checkpoint_blocks(model)
        optimizer = make_optimizer(model, 1e-4, fused=True)  # fused, as on CUDA: no host read of the finite flag
        batch = {k: torch.cat([v] * micro_batches) for k, v in batch.items()}
        for step in (1, 2):
            train_step(model, model, optimizer, loss_fn, batch, step, device, ema_copy, 0.999 if ema else None,
                       micro_batches=micro_batches, precision=precision)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"peak": tracker.peak, "weights": weights, "gradients": trained, "optimizer": 2 * trained,
            "ema": weights if ema else 0, "activations": tracker.peak - weights - 3 * trained - (weights if ema else 0)}


def plan(build, loss_fn, batch, budget, micro_batch=None, checkpoint=None, ema=False, device="cpu"):
    """The settings of one process's training step that fit `budget` bytes -> dict(micro_batch, checkpoint_blocks,
    estimate, fits); when nothing fits, fits is False and the rest describes the smallest setting tried.

    `batch` samples per step are split into batch / micro_batch micro-batches whose gradients add up (the same update
    as the whole batch). Chosen, unless given: the largest micro-batch dividing the batch that fits without
    checkpointing (no recompute); failing that, the largest that fits with it. The activations grow linearly with the
    micro-batch, so two estimates per setting (1 and 2 samples) place every candidate; the chosen one is then
    estimated itself."""
    candidates = [m for m in range(batch, 0, -1) if batch % m == 0] if micro_batch is None else [micro_batch]
    for ckpt in ([False, True] if checkpoint is None else [checkpoint]):
        one, two = (estimate(build, loss_fn, m, min(2, batch // m), ckpt, ema, device)["peak"] for m in (1, 2)) \
            if len(candidates) > 1 else (None, None)
        for m in candidates:
            if one is not None and m > 1 and one + (two - one) * (m - 1) > budget:
                continue
            found = {"micro_batch": m, "checkpoint_blocks": ckpt,
                     "estimate": estimate(build, loss_fn, m, min(2, batch // m), ckpt, ema, device)}
            if found["estimate"]["peak"] <= budget:
                return {**found, "fits": True}
    return {**found, "fits": False}


def budget(card, free=None):
    """The bytes a training step may take on a card of `card` bytes of which `free` are free now (None: all)."""
    headroom = (1 - BUDGET_FRACTION) * card
    return card - headroom if free is None else min(card, free) - headroom


def fake_batch(sample, micro_batch):
    """A batch of micro_batch copies of one dataset sample's shapes and dtypes (call under fake tensors)."""
    return {k: torch.empty((micro_batch, *v.shape), dtype=v.dtype) for k, v in sample.items()}
