"""Shared helpers: command-line errors, device and seeding, atomic writes, model folders, video files, wandb, and the
training loop every training script runs.

Everything here is used by more than one script; each mechanism is written once.
"""
import argparse
import atexit
import contextlib
import copy
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import nn
from tqdm import tqdm


# ----------------------------------------------------------------------------- command-line errors

class UserError(Exception):
    """A mistake in what the user asked for (bad path, bad flag value): reported in one line, exit code 2."""


class TrainingFailed(Exception):
    """Training cannot go on (the loss keeps diverging, the disk is full): one line, exit code 1, and the last good
    training state left as it was."""


def run_cli(main):
    """Run `main()` as a command: a UserError becomes `error: ...` on stderr and exit code 2, a TrainingFailed the same
    with exit code 1, Ctrl-C exit code 130.

    Anything else is a bug in this codebase and keeps its traceback.
    """
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: nothing was written under the final name", file=sys.stderr)
        sys.exit(130)


def first_line(error):
    """What an exception says, in one line: for `error: ...` messages that must stay one line."""
    return (str(error).splitlines() or [type(error).__name__])[0]


def parse_size(text):
    """'320x180' -> (width, height), the order ffmpeg and OpenCV use on the command line."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size must be WIDTHxHEIGHT, e.g. 320x180, not {text!r}") from None
    if width <= 0 or height <= 0:
        raise UserError(f"--size must be positive, not {text!r}")
    return width, height


def positive(kind):
    """argparse type: a number > 0, so that '--fps 0' is refused by the parser (exit code 2, one line)."""
    def check(text):
        value = kind(text)
        if value <= 0:
            raise ValueError(text)
        return value
    check.__name__ = f"positive {kind.__name__}"
    return check


# ----------------------------------------------------------------------------- device and seeds

def get_device(name=None):
    """The device to run on: the one asked for, else cuda (under torchrun the GPU of this process), then mps, then cpu."""
    if name:
        device = torch.device(name)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast: TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(device):
    """The precision every model runs at: bf16 autocast on CUDA (twice the tensor-core rate of TF32), fp32 elsewhere
    (bf16 is slower than fp32 on most CPUs)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def add_compile_flag(parser):
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="torch.compile the model's blocks (default: yes on CUDA; elsewhere no, where the minute "
                             "or two of compiling outweighs the short runs a CPU is used for)")


def add_step_compile_flag(parser):
    """--compile of the generators (generate.py, play.py, bench.py generate|play): see compile_step."""
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the per-step calls, as CUDA graphs on CUDA (off by default: it takes a "
                             "minute or two to compile, and its gain on a GPU is not measured yet)")


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


def compile_step(fn, device):
    """torch.compile a per-step inference call: a cached Euler or MaskGIT step, whose shapes and cache addresses stay
    the same at every call (transformer.KVCache). On CUDA as a CUDA graph ("reduce-overhead"): at batch 1 a step is
    hundreds of small kernels, which one graph replay launches at once."""
    return torch.compile(fn, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)


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


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- atomic files and folders

_UMASK = os.umask(0)
os.umask(_UMASK)

def fsync_dir(path):
    """Make a rename inside `path` durable (a crash after rename must not lose it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it is fsynced and renamed to `path`, on error removed.

    The temporary name keeps the suffix, so writers that choose a format by extension (ffmpeg, imageio) work.
    A reader of `path` sees the old file or the complete new one, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a finished file gets the usual permissions
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary folder beside `path`; on success it replaces `path` whole, on error (Ctrl-C too) it is removed.

    Used for frame stores and model folders: nothing half-written ever stands under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~_UMASK)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- model folders

def save_model(model, folder):
    """Write `model` (an nn.Module with huggingface_hub's PyTorchModelHubMixin and a dataclass `config`) to a folder:
    config.json + model.safetensors, replaced atomically. The unwrapped module is saved (no DDP, no compile prefix)."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        (tmp / "README.md").unlink(missing_ok=True)  # huggingface_hub's generated model card: not part of the model


def load_model(cls, folder_or_repo, device="cpu"):
    """Rebuild a model from a local folder or a hub repo id; the config inside makes flags unnecessary."""
    local = Path(folder_or_repo)
    if not local.exists() and (local.is_absolute() or str(folder_or_repo).count("/") != 1):
        raise UserError(f"model folder {folder_or_repo} does not exist")
    if local.exists() and not (local / "config.json").is_file():
        raise UserError(f"{folder_or_repo} is not a model folder (no config.json)")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # huggingface_hub prints a line on every local load
            model = cls.from_pretrained(str(folder_or_repo), map_location=str(device), strict=True)
    except (OSError, ValueError, TypeError, SafetensorError) as e:  # missing, malformed or truncated files
        raise UserError(f"cannot load {cls.__name__} from {folder_or_repo}: {first_line(e)}") from None
    return model.to(device).eval()


# ----------------------------------------------------------------------------- video files

def to_uint8(frames):
    """Float frames in [-1, 1], (T, C, H, W) tensor -> uint8 array (T, H, W, C)."""
    frames = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(0, 2, 3, 1).cpu().numpy()


def write_mp4(path, frames, fps):
    """uint8 frames (T, H, W, 3) -> H.264 mp4 that browsers play (OpenCV cannot encode H.264; imageio-ffmpeg can)."""
    import imageio_ffmpeg
    frames = np.asarray(frames)
    _, height, width, _ = frames.shape
    # yuv420p needs even sides; pad by repeating the last row/column rather than resizing.
    pad = ((0, 0), (0, height % 2), (0, width % 2), (0, 0))
    frames = np.pad(frames, pad, mode="edge") if any(p[1] for p in pad) else frames
    with atomic_path(path) as tmp:
        writer = imageio_ffmpeg.write_frames(str(tmp), (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264",
                                             pix_fmt_out="yuv420p", quality=8, macro_block_size=1,
                                             output_params=["-y"])
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()


def write_gif(path, frames, fps):
    """uint8 frames (T, H, W, 3) -> looping animated gif."""
    import imageio.v3 as iio
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, np.asarray(frames), extension=".gif", duration=1000 / fps, loop=0)


# ----------------------------------------------------------------------------- logging

class WandbLog:
    """Optional wandb logging: a no-op unless enabled; offline unless WANDB_MODE=online is set by the user."""

    def __init__(self, enabled, project, config, run_id=None, run_dir="results"):
        self.run = None
        if enabled:  # run_id continues the run of a resumed training
            import wandb
            os.environ.setdefault("WANDB_MODE", "offline")
            self.run = wandb.init(project=project, config=config, dir=run_dir, id=run_id, resume="allow")

    @property
    def run_id(self):
        return self.run.id if self.run is not None else None

    def log(self, values, step):
        if self.run is not None:
            self.run.log(values, step=step)

    def image(self, key, image_uint8, step):
        if self.run is not None:
            import wandb
            self.run.log({key: wandb.Image(image_uint8)}, step=step)

    def finish(self):
        if self.run is not None:
            self.run.finish()


# ----------------------------------------------------------------------------- the training loop

# Flags that may differ between a run and its resumption: they change where and how a run is watched, not its result.
RESUMABLE_CHANGES = {"device", "compile", "num_workers", "log_every", "wandb", "save_every", "keep", "resume", "fresh",
                     "max_bad_steps", "poison_steps", "sample_every", "samples", "data", "out", "vae", "phase", "frames",
                     "set"}


def add_training_flags(parser):
    """The flags every training script shares (read by train_loop)."""
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader worker processes (default 2)")
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
    parser.add_argument("--poison_steps", default="", metavar="S,S,...",
                        help="testing aid: make the loss non-finite at these steps, to see the guard above at work")


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


def load_training_state(path, expected):
    """Read a training state (torch.load with weights_only: tensors and plain values, no arbitrary objects) and check
    that it was made by the same model and settings; `expected` holds name, model_class, config and args."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("not a training state")
    except Exception as e:  # a truncated or foreign file fails in zipfile, pickle or torch with many error types
        raise UserError(f"{path} is not a complete training state ({first_line(e)[:120]}); resume from another "
                        f"one with --resume STATE, or start over with --fresh") from None
    different = []
    for key in ("name", "model_class"):
        if state.get(key) != expected[key]:
            different.append(f"{key} {state.get(key)!r} there, {expected[key]!r} here")
    for key in ("config", "args"):
        there, here = state.get(key, {}), expected[key]
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


def make_optimizer(model, lr, fused=None):
    """The AdamW of every training script. Fused on CUDA (the default there): one kernel for all parameters, which
    also skips the update on a flag that stays on the device (train_step). On CPU the fused kernel is about 3x
    slower than the default one for the tiny models, and reading a flag costs nothing."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01,
                             fused=params[0].is_cuda if fused is None else fused)


@torch.no_grad()
def update_ema(ema, model, weight):
    """ema <- ema + weight * (model - ema); weight a float or a 0-dim tensor on the device."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, weight)


def train_step(net, model, optimizer, loss_fn, batch, step, device, ema=None, ema_decay=None, poisoned=False,
               stop=False):
    """One optimisation step that never makes the host wait for the device -> (loss, grad_norm, logs, flags).

    Forward under bf16 autocast on CUDA, backward, gradient clipping at 1, AdamW, EMA. flags (2,) float on the device:
    [the loss or the gradient was not finite, some process asked to stop (stop is this one's answer)], the maximum
    over processes under torchrun. A non-finite step is skipped on the device: the fused AdamW leaves weights, moments
    and its step count alone when its found_inf is 1, and the EMA moves by 0 (a non-fused AdamW, as on CPU, is
    skipped by the host, for which the flag is at hand). The host reads the flags later (train_loop, one step
    behind), so it keeps queueing work while the device computes. poisoned makes the loss NaN (a test's fault).
    """
    with autocast(device):
        loss, logs = loss_fn(net, batch, step)
    if poisoned:
        loss = loss * float("nan")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    flags = torch.stack([~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)),
                         torch.full((), stop, device=device)]).float()  # full: a fill kernel, no copy from the host
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if optimizer.defaults["fused"]:
        optimizer.found_inf = flags[0]
        optimizer.step()
    elif not flags[0]:
        optimizer.step()
    if ema is not None:
        update_ema(ema, model, (1 - ema_decay) * (1 - flags[0]))
    return loss.detach(), grad_norm, logs, flags


def copy_to_host(tensor):
    """Start copying a device tensor to the host without waiting -> read(), which returns it as a list when called
    (on CUDA it waits for the copy, long done if called a step later)."""
    if tensor.device.type != "cuda":
        return tensor.tolist
    host = tensor.to("cpu", non_blocking=True)  # into pinned memory
    done = torch.cuda.Event()
    done.record()
    return lambda: (done.synchronize(), host.tolist())[1]


def train_loop(model, loss_fn, dataset, args, device, folder, log_path, name, project, ema_decay=None, on_log=None):
    """Train `model` for args.steps steps and save it to `folder` (the EMA copy when ema_decay is set).

    loss_fn(net, batch, step) -> (loss, logs): net is the model to call (under torchrun its DistributedDataParallel
    wrapper, which averages the gradients over processes), batch a dict of tensors on `device`. `args` brings
    batch_size (the global batch: each of N processes reads 1 / N of it), lr, steps, seed and the flags of
    add_training_flags. AdamW, linear warmup then cosine decay, gradient clipping at 1, bf16 autocast on CUDA. Every
    log_every steps: a progress-bar line, an entry in the JSON log at `log_path`, wandb, and on_log(step, model) for
    the script's own images (rank 0 only, as are all logs and files).

    Every save_every steps, at the end, and on SIGTERM or Ctrl-C (then the process exits with 128 + the signal's
    number), a training state goes to states_folder(folder): model and its buffers, EMA, optimiser, schedule, step,
    every RNG of every process and the log. The data position is the step (BatchOrder), so a resumed run repeats the
    uninterrupted one exactly on CPU. A step whose loss or gradient is not finite is skipped; max_bad_steps in a row
    stop training. The host reads each step's flags one step later (train_step), except at log and save steps and
    the last, where it catches up; every process does the same, so all stop at the same step. Returns the trained
    model.
    """
    rank, world = distributed()
    main = rank == 0
    if args.batch_size % world:
        raise UserError(f"--batch_size {args.batch_size} is the global batch and must divide among {world} processes")
    if len(dataset) < args.batch_size:
        raise UserError(f"{name}: {len(dataset)} training windows, fewer than --batch_size {args.batch_size}")
    try:
        poison = {int(s) for s in args.poison_steps.split(",") if s}
    except ValueError:
        raise UserError(f"--poison_steps takes step numbers separated by commas, not {args.poison_steps!r}") from None
    expected = {"name": name, "model_class": type(model).__name__, "config": dataclasses.asdict(model.config),
                "args": {k: v for k, v in sorted(vars(args).items()) if k not in RESUMABLE_CHANGES}}
    states = states_folder(folder)
    resume = resume_path(args, folder)
    state = load_training_state(resume, expected) if resume else None
    if main and args.fresh and states.exists():
        shutil.rmtree(states)
    for leftover in states.glob(".step_*.tmp*") if main else []:  # a run killed while it was saving
        leftover.unlink()

    optimizer = make_optimizer(model, args.lr)
    warmup = max(1, min(1000, args.steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1, s / args.steps))))
    ema = copy.deepcopy(model).eval().requires_grad_(False) if ema_decay else None
    history, start, bad_steps = [], 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        for key, buffer in model.named_buffers():  # non-persistent ones too (e.g. idle counters of dead-code restart)
            buffer.copy_(state["buffers"][key])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        history, start, bad_steps = state["history"], state["step"], state["bad_steps"]
        if len(state["rng"]) == world:
            set_rng_states(state["rng"][rank])
        elif main:
            print(f"{name}: the state was saved by {len(state['rng'])} processes, this run has {world}: random "
                  f"streams start afresh, so the result will not be bit-for-bit the uninterrupted one")
        if main:
            print(f"{name}: resuming from {resume} (step {start} of {args.steps})")
    elif rank > 0:
        seed_everything(args.seed + 1000 * rank)  # its own noise; rank 0 keeps the stream of a single-process run
    wandb = WandbLog(args.wandb and main, project, {**vars(args), "model": name}, run_id=state and state["wandb_id"])
    net = model
    if world > 1:  # starts by broadcasting rank 0's parameters and buffers
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    if use_compile(args, device):
        compile_blocks(model)

    def save(step):
        rngs = [rng_states()]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_states())
        path = None
        if main:
            path = save_training_state(states, {
                **expected, "step": step, "bad_steps": bad_steps, "history": history, "wandb_id": wandb.run_id,
                "model": model.state_dict(), "buffers": dict(model.named_buffers()),
                "ema": ema.state_dict() if ema is not None else None, "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "rng": rngs}, args.keep)
        if world > 1:
            dist.barrier()
        return path

    # A dedicated generator keeps the DataLoader from drawing its worker seeds from the global RNG.
    order = BatchOrder(len(dataset), args.batch_size, args.seed, start, rank, world)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=order, num_workers=args.num_workers,
                                         pin_memory=device.type == "cuda", worker_init_fn=leave_signals_to_main,
                                         generator=torch.Generator().manual_seed(0))
    signals = []  # the signal that asked us to stop, once it came
    unread = []  # (step, loss, gradient norm, read() of its flags) of steps whose flags the host has not read yet
    handlers = {s: signal.signal(s, lambda number, frame: signals.append(number))
                for s in (signal.SIGTERM, signal.SIGINT)}
    started = time.time()
    model.train()
    try:
        batches = iter(loader) if start < args.steps else None
        bar = tqdm(range(start + 1, args.steps + 1), desc=name, initial=start, total=args.steps, disable=not main)
        stop = False
        for step in bar:
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            loss, grad_norm, logs, flags = train_step(net, model, optimizer, loss_fn, batch, step, device, ema,
                                                      ema_decay, poisoned=step in poison, stop=bool(signals))
            schedule.step()
            unread.append((step, loss, grad_norm, copy_to_host(flags)))
            log_now = step % args.log_every == 0 or step in (start + 1, args.steps)
            while len(unread) > (0 if log_now or step % args.save_every == 0 or step == args.steps else 1):
                read_step, read_loss, read_norm, read = unread.pop(0)
                skipped, stopping = read()
                stop = stop or bool(stopping)
                bad_steps = bad_steps + 1 if skipped else 0
                if skipped and main:
                    bar.write(f"{name} step {read_step}: loss {read_loss.item():.4g}, gradient norm {read_norm.item():.4g}"
                              f": step skipped ({bad_steps} in a row, --max_bad_steps {args.max_bad_steps})",
                              file=sys.stderr)
                if bad_steps >= args.max_bad_steps:
                    last = training_states(states)
                    raise TrainingFailed(f"{name}: {bad_steps} non-finite steps in a row up to step {read_step}; "
                                         "stopped. " + (f"The last good training state is {last[-1]}" if last else
                                                        "No training state was saved yet"))
            if main and log_now:
                logs = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in logs.items()}
                history.append({"step": step, "loss": loss.item(), "lr": schedule.get_last_lr()[0],
                                "seconds": round(time.time() - started, 2), **logs})
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if not isinstance(v, list)})
                if "code_usage" in logs:  # per-code usage of discrete latents: the first sign of collapse
                    bar.write(f"{name} step {step}: code usage " + " ".join(f"{u:.0%}" for u in logs["code_usage"]))
                wandb.log({k: v for k, v in history[-1].items() if not isinstance(v, list)}, step)
                if on_log is not None:
                    model.eval()
                    on_log(step, ema if ema is not None else model, wandb)
                    model.train()
            if step % args.save_every == 0 or step == args.steps or stop:
                path = save(step)
            if stop:
                bar.close()
                number = signals[0] if signals else signal.SIGTERM  # another process got the signal
                if main:
                    print(f"{name}: stopped by {signal.Signals(number).name} after step {step}; training state saved "
                          f"to {path}. Rerun the same command to continue.", file=sys.stderr)
                sys.exit(128 + number)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if start == args.steps and main:
        print(f"{name}: already trained for {args.steps} steps ({resume}); writing {folder} again")
    wandb.finish()
    model.eval()
    final = ema if ema is not None else model
    if world > 1:  # DDP keeps the processes in lockstep; prove it before trusting rank 0's copy
        digests = [None] * world
        dist.all_gather_object(digests, hashlib.sha256(b"".join(
            t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes() for t in final.state_dict().values()
        )).hexdigest())
        if len(set(digests)) > 1:
            raise TrainingFailed(f"{name}: the weights differ between the {world} processes")
        if main:
            print(f"{name}: weights identical in all {world} processes")
    if main:
        save_model(final, folder)
        atomic_write_text(log_path, json.dumps(history, indent=1))
        print(f"{name}: saved {folder} ({sum(p.numel() for p in final.parameters()) / 1e6:.2f}M parameters, "
              f"{time.time() - started:.0f} s)")
    if world > 1:
        dist.barrier()  # the next phase may read the folder rank 0 just wrote
    return final
