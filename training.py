"""The training machinery every training script runs: `train_loop` and what it is made of.

  train_loop(model, loss_fn, dataset, args, device, folder, log_path, name, project)

does, in this order: check the batch against the dataset and the processes; find the training state to resume from
and check that it belongs to this run; build AdamW, the warmup + cosine schedule and the EMA, and restore them;
wrap the model for DDP and compile its blocks; then step through the batches of `BatchOrder`, logging, saving training
states and stopping on a signal or on too many non-finite steps; at the end prove that every process holds the same
weights and save the model folder. Each of those is a function below.

Why the pieces look as they do:
  - A resumed run must end with the weights of an uninterrupted one. So a training state holds everything that
    decides what comes next (weights and buffers, EMA, optimiser, schedule, every RNG of every process, the step),
    and the data order is a function of (seed, step) alone (`BatchOrder`), not of how far a DataLoader got.
  - A training step never waits for the device (`train_step`). Its flags (non-finite, asked to stop) are read by the
    host one step later, so the host keeps queueing work while the device computes.
  - Under torchrun every process must take the same decisions: skip, stop and save are agreed through an all-reduce.
"""
import argparse
import atexit
import copy
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import memory
from step import checkpoint_blocks, copy_to_host, make_optimizer, train_step
from utils import TrainingFailed, UserError, WandbLog, add_precision_flag, atomic_path, atomic_write_text, \
    first_line, positive, save_model, seed_everything

# train_loop's own flags that change where and how a run is watched, not its result: they may differ between a run
# and its resumption. Each script adds its own such flags (train_loop's `unchanged`).
WATCH_FLAGS = {"device", "compile", "num_workers", "log_every", "wandb", "save_every", "keep", "resume", "fresh",
               "max_bad_steps", "micro_batch", "checkpoint_blocks", "gpu_memory", "deterministic"}
DEFAULT_WORKERS = max(2, min(8, (os.cpu_count() or 2) // 2))  # loader processes: enough to feed a GPU, few on a laptop
# A testing aid, not a flag: the steps (comma-separated) whose loss is made NaN, to see the non-finite guard at work.
POISON_STEPS_VARIABLE = "GAMEWORLD_POISON_STEPS"
# Another: RANK:STEP, that process of a torchrun launch fails with an exception at that step, to see the launch end.
CRASH_VARIABLE = "GAMEWORLD_CRASH"


# ----------------------------------------------------------------------------- flags

def add_training_flags(parser):
    """The flags every training script shares (read by train_loop)."""
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    add_precision_flag(parser)
    parser.add_argument("--num_workers", type=int, default=DEFAULT_WORKERS,
                        help=f"DataLoader worker processes per training process (default {DEFAULT_WORKERS}: half this "
                             f"machine's cores, 2 to 8)")
    parser.add_argument("--log_every", type=positive(int), default=25, help="steps between log lines (default 25)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data order, noise and initialisation")
    parser.add_argument("--wandb", action="store_true", help="log to wandb (offline unless WANDB_MODE=online)")
    add_compile_flag(parser)
    parser.add_argument("--save_every", type=positive(int), default=1000,
                        help="steps between training states (model, EMA, optimiser, RNGs, data position) in "
                             "checkpoints/ beside --out; one is also written on SIGTERM or Ctrl-C (default 1000)")
    parser.add_argument("--keep", type=positive(int), default=2, help="training states kept (default 2)")
    parser.add_argument("--resume", nargs="?", const="latest", metavar="STATE",
                        help="continue from a training state: a step_*.pt file, a checkpoints folder, or a model "
                             "folder (its checkpoints); alone, the latest of --out. Rerunning the same command into "
                             "the same --out resumes anyway")
    parser.add_argument("--fresh", action="store_true",
                        help="delete the training states of --out and start over")
    parser.add_argument("--max_bad_steps", type=positive(int), default=20,
                        help="non-finite losses or gradients in a row before training stops (each is skipped; "
                             "default 20)")
    parser.add_argument("--micro_batch", type=positive(int),
                        help="samples per forward and backward pass: each process's share of --batch_size is run in "
                             "micro-batches of this size whose gradients add up, the same update with less memory "
                             "(default: on CUDA, the largest that fits the GPU by memory.py's estimate; elsewhere "
                             "the whole share)")
    parser.add_argument("--checkpoint_blocks", action=argparse.BooleanOptionalAction,
                        help="activation checkpointing: each transformer block recomputes its forward in backward "
                             "instead of keeping its activations (about a third more compute; default: on CUDA only "
                             "when no micro-batch fits without it)")
    parser.add_argument("--deterministic", action="store_true",
                        help="on CUDA, deterministic kernels only (cuBLAS workspace, no cuDNN autotuning): the same "
                             "command then gives the same weights bit for bit, also after a kill and resume, at some "
                             "cost in speed. A CPU run is deterministic without it")
    parser.add_argument("--gpu_memory", type=positive(float), metavar="GB",
                        help="plan --micro_batch and --checkpoint_blocks for a GPU of this many GB instead of the "
                             "device's own free memory; on a machine without one, a dry run of the fit")


def add_compile_flag(parser):
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="torch.compile the model's blocks (default: yes on CUDA; elsewhere no, where the minute "
                             "or two of compiling outweighs the short runs a CPU is used for)")


def use_compile(args, device):
    return args.compile if args.compile is not None else device.type == "cuda"


def compile_blocks(model):
    """torch.compile, in place, the blocks that hold a model's FLOPs, each on its own: every element of an
    nn.ModuleList (transformer blocks, which share one compiled graph) and every nn.Sequential outside one (the conv
    tokenizer's encoder and decoder). Compiling blocks rather than the whole loss keeps the loss's host-side choices
    (random context-forcing prefixes, Python loops of a rollout) out of the compiler: no recompiles, no graph breaks."""
    for child in model.children():
        if isinstance(model, nn.ModuleList) or isinstance(child, nn.Sequential):
            child.compile()
        else:
            compile_blocks(child)


# ----------------------------------------------------------------------------- processes

def distributed():
    """(rank, world size) of this process. Under torchrun (WORLD_SIZE > 1) the process group is joined on the first
    call, NCCL on GPUs and gloo on CPU; a plain `python script.py` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(dist.destroy_process_group)
    return dist.get_rank(), world


def barrier():
    """Wait for every process of a torchrun launch (nothing to wait for otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


PREPARE_TIMEOUT = datetime.timedelta(hours=6)  # encoding or tokenizing a store of hours of footage on one GPU
_waiting_group = []  # the process group rank_zero_first waits in, made on first use


def rank_zero_first(prepare):
    """prepare() -> its result, in every process, run by rank 0 of a torchrun launch before the others.

    For the data a training script prepares on first use (a video prepared into a store, a store encoded into
    latents, labelled by a LAM, tokenized): rank 0 makes it while the others wait, then they run prepare() too and
    find it made, so it is made once and no two processes write the same folder. They wait in a gloo group of its
    own whose timeout fits a long preparation (PREPARE_TIMEOUT); training's collectives keep the default timeout, so
    a hang there still ends in minutes. Without torchrun: prepare()."""
    rank, world = distributed()
    if world == 1:
        return prepare()
    if not _waiting_group:
        _waiting_group.append(dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT))
    result = prepare() if rank == 0 else None
    dist.barrier(group=_waiting_group[0])
    return result if rank == 0 else prepare()


# ----------------------------------------------------------------------------- data order

class BatchOrder(torch.utils.data.Sampler):
    """The batches of a training run, without end: epoch e is a permutation of the dataset seeded by (seed, e), cut
    into global batches of batch_size (the remainder dropped), of which process `rank` of `world` reads its
    1 / world share. Batch k is the same whether the run starts at 0 or at k, so a resumed run reads exactly the data
    the uninterrupted one would have, and N processes together read what one process would."""

    def __init__(self, size, batch_size, seed, start=0, rank=0, world=1):
        self.size, self.batch_size, self.seed, self.start = size, batch_size, seed, start
        self.share = batch_size // world
        self.offset = rank * self.share

    def __iter__(self):
        per_epoch, epoch, order = self.size // self.batch_size, None, None
        for k in itertools.count(self.start):
            if k // per_epoch != epoch:
                epoch = k // per_epoch
                order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            first = (k % per_epoch) * self.batch_size + self.offset
            yield order[first:first + self.share].tolist()


def leave_signals_to_main(worker_id):
    """DataLoader workers ignore Ctrl-C and SIGTERM (which a terminal or a job scheduler sends to every process) and
    leave them to the main process, which saves a training state before it exits; workers end with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def batches(dataset, args, device, start, rank, world):
    """The batches from step start + 1 on, as dicts of tensors on `device`."""
    order = BatchOrder(len(dataset), args.batch_size, args.seed, start, rank, world)
    # A generator of its own keeps the DataLoader from drawing its worker seeds from the global RNG.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=order, num_workers=args.num_workers,
                                         pin_memory=device.type == "cuda", worker_init_fn=leave_signals_to_main,
                                         generator=torch.Generator().manual_seed(0))
    for batch in loader:
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ----------------------------------------------------------------------------- random states

def rng_states():
    numpy_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]]}


def set_rng_states(states):
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    key, *rest = states["numpy"]
    np.random.set_state(("MT19937", key.numpy().astype(np.uint32), *rest))


# ----------------------------------------------------------------------------- training states

def states_folder(model_folder):
    """Where the training states of a model folder live: checkpoints/<name>/ beside it (models/dit ->
    models/checkpoints/dit), so that saving the model folder never touches them."""
    model_folder = Path(model_folder)
    return model_folder.parent / "checkpoints" / model_folder.name


def training_states(folder):
    """The step_*.pt files of a states folder, oldest first."""
    return sorted(Path(folder).glob("step_*.pt")) if Path(folder).is_dir() else []


def resume_path(args, folder):
    """The training state this run continues from, or None to start afresh (see the --resume and --fresh flags)."""
    if args.fresh:
        if args.resume:
            raise UserError("--fresh starts over and --resume continues: pass one of them")
        return None
    if args.resume in (None, "latest"):
        states = training_states(states_folder(folder))
        if not states and args.resume == "latest":
            raise UserError(f"--resume: no training state in {states_folder(folder)}")
        return states[-1] if states else None
    path = Path(args.resume)
    if path.is_dir() and (path / "config.json").is_file():  # a model folder: its training states
        path = states_folder(path)
    if path.is_dir():
        states = training_states(path)
        if not states:
            raise UserError(f"--resume: no training state (step_*.pt) in {path}")
        return states[-1]
    if not path.is_file():
        raise UserError(f"--resume: {path} does not exist")
    return path


def run_identity(name, model, args, unchanged):
    """What a training state must match to be resumed by this run: the model, its config and every flag that
    changes the result (all but WATCH_FLAGS and the script's own `unchanged` ones)."""
    ignored = WATCH_FLAGS | set(unchanged)
    return {"name": name, "model_class": type(model).__name__, "config": dataclasses.asdict(model.config),
            "args": {k: v for k, v in sorted(vars(args).items()) if k not in ignored}}


def load_training_state(path, identity):
    """Read a training state (torch.load with weights_only: tensors and plain values, no arbitrary objects) and check
    that it was made by the same model and settings (run_identity)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("not a training state")
    except Exception as e:  # a truncated or foreign file fails in zipfile, pickle or torch with many error types
        raise UserError(f"{path} is not a complete training state ({first_line(e)[:120]}); resume from another "
                        f"one with --resume STATE, or start over with --fresh") from None
    different = []
    for key in ("name", "model_class"):
        if state.get(key) != identity[key]:
            different.append(f"{key} {state.get(key)!r} there, {identity[key]!r} here")
    for key in ("config", "args"):
        there, here = state.get(key, {}), identity[key]
        for field in sorted(set(there) | set(here)):
            if there.get(field, "(unset)") != here.get(field, "(unset)"):
                different.append(f"{field} {there.get(field, '(unset)')!r} there, {here.get(field, '(unset)')!r} here")
    if different:
        raise UserError(f"the training state {path} is from another run: {'; '.join(different)} (rerun with its "
                        f"settings, or pass --fresh to start over)")
    return state


def save_training_state(folder, state, keep):
    """Write state as folder/step_<step>.pt (temporary name, fsync, rename), then delete all but the newest `keep`.
    A failed write (a full disk) leaves the earlier states as they were."""
    path = Path(folder) / f"step_{state['step']:08d}.pt"
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as e:
        earlier = [p for p in training_states(folder) if p != path]
        kept = f"the last complete one, {earlier[-1]}, is intact" if earlier else "none was saved before"
        raise TrainingFailed(f"could not write the training state {path}: {first_line(e)}; {kept}") from None
    for old in training_states(folder)[:-keep]:
        old.unlink()
    return path


def clean_states(folder, fresh):
    """--fresh deletes the states; a state whose write was killed halfway leaves a temporary file, removed here."""
    if fresh and folder.exists():
        shutil.rmtree(folder)
    for leftover in folder.glob(".step_*.tmp*"):
        leftover.unlink()


# ----------------------------------------------------------------------------- optimisation

def make_schedule(optimizer, steps):
    """Linear warmup over a tenth of the steps (at most 1,000), then cosine decay to 0 at `steps`."""
    warmup = max(1, min(1000, steps // 10))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1, s / steps))))


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class Run:
    """One training run's moving parts; a training state is this, written down."""
    name: str
    model: nn.Module
    ema: nn.Module | None
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    ema_decay: float | None
    identity: dict
    states: Path                     # the folder of its training states
    rank: int = 0
    world: int = 1
    step: int = 0                    # steps done
    bad_steps: int = 0               # non-finite steps in a row, up to the last one read
    history: list = dataclasses.field(default_factory=list)  # the log entries
    wandb: WandbLog | None = None

    @property
    def main(self):
        return self.rank == 0


def poison_steps():
    text = os.environ.get(POISON_STEPS_VARIABLE, "")
    try:
        return {int(s) for s in text.split(",") if s}
    except ValueError:
        raise UserError(f"{POISON_STEPS_VARIABLE} takes step numbers separated by commas, not {text!r}") from None


def step_settings(model, loss_fn, dataset, args, device, world, name, ema):
    """-> (micro-batches per step, activation checkpointing) for this process's share of the batch. With a memory
    budget (memory.budget of a CUDA device's memory, or of --gpu_memory) they are planned by memory.plan from the
    estimated peak of the step (what the flags leave open); without one, they are what the flags say. Under torchrun
    every process plans for the smallest budget of them all, so all take the same plan: micro-batch counts that
    differed would issue different numbers of collectives, and the launch would hang."""
    share = args.batch_size // world
    if args.micro_batch and share % args.micro_batch:
        raise UserError(f"--micro_batch {args.micro_batch} must divide each process's batch of {share} samples "
                        f"(--batch_size {args.batch_size} over {world} process{'es' if world > 1 else ''})")
    card = args.gpu_memory * memory.GB if args.gpu_memory else None
    if card is None and device.type == "cuda":
        torch.cuda.empty_cache()  # what an earlier phase of this process cached is free for this one
        free, card = torch.cuda.mem_get_info(device)
    if card is None:
        return share // (args.micro_batch or share), bool(args.checkpoint_blocks)
    budget = memory.budget(card, None if args.gpu_memory else free)
    if world > 1:
        smallest = torch.tensor([budget], dtype=torch.float64, device=device)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        budget = smallest.item()
    sample = dataset[0]
    found = memory.plan(lambda m: (type(model)(model.config), memory.fake_batch(sample, m)), loss_fn, share, budget,
                        args.micro_batch, args.checkpoint_blocks, ema, device if device.type == "cuda" else "cpu")
    peak = found["estimate"]["peak"] / memory.GB
    if not found["fits"]:
        raise UserError(f"{name}: a step of {share} samples per process needs an estimated {peak:.3g} GB even at "
                        f"micro-batch {found['micro_batch']} with activation checkpointing "
                        f"{'on' if found['checkpoint_blocks'] else 'off'}, more than the {budget / memory.GB:.3g} GB "
                        f"a {card / memory.GB:.3g} GB GPU leaves; lower --batch_size or train on more GPUs")
    if distributed()[0] == 0:
        print(f"{name}: micro-batch {found['micro_batch']} of {share} samples, activation checkpointing "
              f"{'on' if found['checkpoint_blocks'] else 'off'}: estimated peak {peak:.3g} GB of "
              f"{budget / memory.GB:.3g} GB")
    return share // found["micro_batch"], found["checkpoint_blocks"]


def check_batch_size(args, dataset, world, name):
    if args.batch_size % world:
        raise UserError(f"--batch_size {args.batch_size} is the global batch and must divide among {world} processes")
    if len(dataset) < args.batch_size:
        raise UserError(f"{name}: {len(dataset)} training windows, fewer than --batch_size {args.batch_size}")


def restore(run, state, resume, steps):
    """Load a training state into the run: weights and buffers, EMA, optimiser, schedule, progress and RNGs."""
    model = run.model
    model.load_state_dict(state["model"])
    for key, buffer in model.named_buffers():  # non-persistent ones too (e.g. idle counters of dead-code restart)
        buffer.copy_(state["buffers"][key])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    run.history, run.step, run.bad_steps = state["history"], state["step"], state["bad_steps"]
    if len(state["rng"]) == run.world:
        set_rng_states(state["rng"][run.rank])
    elif run.main:
        print(f"{run.name}: the state was saved by {len(state['rng'])} processes, this run has {run.world}: random "
              f"streams start afresh, so the result will not be bit-for-bit the uninterrupted one")
    if run.main:
        print(f"{run.name}: resuming from {resume} (step {run.step} of {steps})")


def save(run, keep):
    """Write the run's training state (rank 0 writes; every process gives its RNG states) -> its path on rank 0."""
    rngs = [rng_states()]
    if run.world > 1:
        rngs = [None] * run.world
        dist.all_gather_object(rngs, rng_states())
    path = None
    if run.main:
        path = save_training_state(run.states, {
            **run.identity, "step": run.step, "bad_steps": run.bad_steps, "history": run.history,
            "wandb_id": run.wandb.run_id, "model": run.model.state_dict(), "buffers": dict(run.model.named_buffers()),
            "ema": run.ema.state_dict() if run.ema is not None else None, "optimizer": run.optimizer.state_dict(),
            "schedule": run.schedule.state_dict(), "rng": rngs}, keep)
    barrier()
    return path


def read_flags(run, unread, keep, max_bad_steps, bar):
    """Read the flags of the steps in `unread` until `keep` are left -> whether some process asked to stop. Counts
    non-finite (skipped) steps in a row and stops training with TrainingFailed at max_bad_steps."""
    stopping = False
    while len(unread) > keep:
        step, loss, grad_norm, read = unread.pop(0)
        skipped, stop = read()
        stopping = stopping or bool(stop)
        run.bad_steps = run.bad_steps + 1 if skipped else 0
        if skipped and run.main:
            bar.write(f"{run.name} step {step}: loss {loss.item():.4g}, gradient norm {grad_norm.item():.4g}: step "
                      f"skipped ({run.bad_steps} in a row, --max_bad_steps {max_bad_steps})", file=sys.stderr)
        if run.bad_steps >= max_bad_steps:
            last = training_states(run.states)
            raise TrainingFailed(f"{run.name}: {run.bad_steps} non-finite steps in a row up to step {step}; stopped. "
                                 + (f"The last good training state is {last[-1]}" if last else
                                    "No training state was saved yet"))
    return stopping


def log(run, loss, logs, started, bar, on_log):
    """A log step (rank 0): an entry in the history, the progress bar, wandb, and the script's own pictures."""
    logs = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in logs.items()}
    run.history.append({"step": run.step, "loss": loss.item(), "lr": run.schedule.get_last_lr()[0],
                        "seconds": round(time.time() - started, 2), **logs})
    bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if not isinstance(v, list)})
    if "code_usage" in logs:  # per-code usage of discrete latents: the first sign of collapse
        bar.write(f"{run.name} step {run.step}: code usage " + " ".join(f"{u:.0%}" for u in logs["code_usage"]))
    run.wandb.log({k: v for k, v in run.history[-1].items() if not isinstance(v, list)}, run.step)
    if on_log is not None:
        run.model.eval()
        on_log(run.step, run.ema if run.ema is not None else run.model, run.wandb)
        run.model.train()


def run_steps(run, net, loss_fn, data, args, device, on_log, micro_batches):
    """Steps run.step + 1 .. args.steps; on SIGTERM or Ctrl-C a training state is saved and the process exits with
    128 + the signal's number (every process at the same step, through the stop flag)."""
    poisoned, first = poison_steps(), run.step + 1
    crash = os.environ.get(CRASH_VARIABLE, "")
    signals = []  # the signal that asked us to stop, once it came
    unread = []  # (step, loss, gradient norm, read() of its flags) of steps whose flags the host has not read yet
    handlers = {s: signal.signal(s, lambda number, frame: signals.append(number))
                for s in (signal.SIGTERM, signal.SIGINT)}
    started = time.time()
    run.model.train()
    try:
        bar = tqdm(range(run.step + 1, args.steps + 1), desc=run.name, initial=run.step, total=args.steps,
                   disable=not run.main)
        for step in bar:
            if crash == f"{run.rank}:{step}":
                raise RuntimeError(f"{CRASH_VARIABLE}: process {run.rank} fails at step {step}")
            loss, grad_norm, logs, flags = train_step(net, run.model, run.optimizer, loss_fn, next(data), step, device,
                                                      run.ema, run.ema_decay, poisoned=step in poisoned,
                                                      stop=bool(signals), micro_batches=micro_batches)
            run.schedule.step()
            run.step = step
            unread.append((step, loss, grad_norm, copy_to_host(flags)))
            log_now = step % args.log_every == 0 or step in (first, args.steps)
            save_now = step % args.save_every == 0 or step == args.steps
            stop = read_flags(run, unread, 0 if log_now or save_now else 1, args.max_bad_steps, bar)
            if run.main and log_now:
                log(run, loss, logs, started, bar, on_log)
            if save_now or stop:
                path = save(run, args.keep)
            if stop:
                bar.close()
                number = signals[0] if signals else signal.SIGTERM  # another process got the signal
                if run.main:
                    print(f"{run.name}: stopped by {signal.Signals(number).name} after step {step}; training state "
                          f"saved to {path}. Rerun the same command to continue.", file=sys.stderr)
                sys.exit(128 + number)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        # Ends the DataLoader's workers now, whatever ended the loop. An exception's traceback would otherwise keep the
        # loader alive until exit, where multiprocessing stops its workers with SIGTERM, which they ignore
        # (leave_signals_to_main): the process, and with it a torchrun launch, would hang.
        data.close()
    return time.time() - started


def same_weights_everywhere(run, model):
    """Under torchrun: DDP keeps the processes in lockstep; prove it before trusting rank 0's copy."""
    digests = [None] * run.world
    dist.all_gather_object(digests, hashlib.sha256(b"".join(
        t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes() for t in model.state_dict().values()
    )).hexdigest())
    if len(set(digests)) > 1:
        raise TrainingFailed(f"{run.name}: the weights differ between the {run.world} processes")
    if run.main:
        print(f"{run.name}: weights identical in all {run.world} processes")


def train_loop(model, loss_fn, dataset, args, device, folder, log_path, name, project, ema_decay=None, on_log=None,
               unchanged=()):
    """Train `model` for args.steps steps and save it to `folder` (the EMA copy when ema_decay is set).

    loss_fn(net, batch, step) -> (loss, logs): net is the model to call (under torchrun its DistributedDataParallel
    wrapper, which averages the gradients over processes), batch a dict of tensors on `device`. `args` brings
    batch_size (the global batch: each of N processes reads 1 / N of it), lr, steps, seed and the flags of
    add_training_flags; `unchanged` names the script's own flags that do not change the result (they may differ on
    resume). Every log_every steps: a progress-bar line, an entry in the JSON log at `log_path`, wandb, and
    on_log(step, model, wandb) for the script's own pictures (rank 0 only, as are all logs and files).

    Every save_every steps, at the end, and on SIGTERM or Ctrl-C, a training state goes to states_folder(folder). A
    step whose loss or gradient is not finite is skipped; max_bad_steps in a row stop training. Returns the trained
    model (the EMA copy when there is one).
    """
    rank, world = distributed()
    check_batch_size(args, dataset, world, name)
    micro_batches, checkpoint = step_settings(model, loss_fn, dataset, args, device, world, name, bool(ema_decay))
    identity = run_identity(name, model, args, unchanged)
    states = states_folder(folder)
    resume = resume_path(args, folder)
    state = load_training_state(resume, identity) if resume else None
    if rank == 0:
        clean_states(states, args.fresh)

    optimizer = make_optimizer(model, args.lr)
    run = Run(name, model, copy.deepcopy(model).eval().requires_grad_(False) if ema_decay else None, optimizer,
              make_schedule(optimizer, args.steps), ema_decay, identity, states, rank, world)
    if state is not None:
        restore(run, state, resume, args.steps)
    elif rank > 0:
        seed_everything(args.seed + 1000 * rank)  # its own noise; rank 0 keeps the stream of a single-process run
    run.wandb = WandbLog(args.wandb and run.main, project, {**vars(args), "model": name},
                         run_id=state and state["wandb_id"])
    net = model
    if world > 1:  # starts by broadcasting rank 0's parameters and buffers
        # gradient_as_bucket_view: the gradients live in DDP's communication buckets, not in a second copy beside them
        # (memory.py's estimate has one copy)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None, gradient_as_bucket_view=True)
    if checkpoint:
        checkpoint_blocks(model)
    if use_compile(args, device):
        compile_blocks(model)

    start = run.step
    seconds = run_steps(run, net, loss_fn, batches(dataset, args, device, start, rank, world), args, device, on_log,
                        micro_batches) if start < args.steps else 0
    if start == args.steps and run.main:
        print(f"{name}: already trained for {args.steps} steps ({resume}); writing {folder} again")
    run.wandb.finish()
    model.eval()
    final = run.ema if run.ema is not None else model
    if world > 1:
        # DDP hands every process rank 0's buffers at each forward; those the last forward updated (a batch norm's
        # running statistics) differ: rank 0's, as the next forward would have them
        for buffer in final.buffers():
            dist.broadcast(buffer, 0)
        same_weights_everywhere(run, final)
    if run.main:
        save_model(final, folder)
        atomic_write_text(log_path, json.dumps(run.history, indent=1))
        print(f"{name}: saved {folder} ({sum(p.numel() for p in final.parameters()) / 1e6:.2f}M parameters, "
              f"{seconds:.0f} s)")
    barrier()  # the next phase may read the folder rank 0 just wrote
    return final
