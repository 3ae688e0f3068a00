"""Shared helpers: command-line errors, device and seeding, atomic writes, model folders, video files, wandb, and the
training loop every training script runs.

Everything here is used by more than one script; each mechanism is written once.
"""
import contextlib
import copy
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


# ----------------------------------------------------------------------------- command-line errors

class UserError(Exception):
    """A mistake in what the user asked for (bad path, bad flag value): reported in one line, exit code 2."""


def run_cli(main):
    """Run `main()` as a command: a UserError becomes `error: ...` on stderr and exit code 2, Ctrl-C exit code 130.

    Anything else is a bug in this codebase and keeps its traceback.
    """
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: nothing was written under the final name", file=sys.stderr)
        sys.exit(130)


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
    """The device to run on: the one asked for, else cuda, then mps, then cpu."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot load {cls.__name__} from {folder_or_repo}: {str(e).splitlines()[0]}") from None
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

    def __init__(self, enabled, project, config, run_dir="results"):
        self.run = None
        if enabled:
            import wandb
            os.environ.setdefault("WANDB_MODE", "offline")
            self.run = wandb.init(project=project, config=config, dir=run_dir)

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

def add_training_flags(parser):
    """The flags every training script shares (read by train_loop)."""
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    parser.add_argument("--log_every", type=positive(int), default=25, help="steps between log lines (default 25)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data order, noise and initialisation")
    parser.add_argument("--wandb", action="store_true", help="log to wandb (offline unless WANDB_MODE=online)")


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def train_loop(model, loss_fn, dataset, args, device, folder, log_path, name, project, ema_decay=None, on_log=None):
    """Train `model` for args.steps steps and save it to `folder` (the EMA copy when ema_decay is set).

    loss_fn(batch, step) -> (loss, logs) with batch a dict of tensors on `device`; `args` brings batch_size, lr,
    steps, log_every, num_workers and wandb. AdamW, linear warmup then cosine decay, gradient clipping at 1,
    bf16 autocast on CUDA. Every log_every steps: a progress-bar line, an entry in the JSON log at `log_path`,
    wandb, and on_log(step, model) for the script's own images. Returns the trained model.
    """
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.num_workers > 0)
    if len(loader) == 0:
        raise UserError(f"{name}: {len(dataset)} training windows, fewer than --batch_size {args.batch_size}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=0.01)
    warmup = max(1, min(1000, args.steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1, s / args.steps))))
    ema = copy.deepcopy(model).eval().requires_grad_(False) if ema_decay else None
    wandb = WandbLog(args.wandb, project, {**vars(args), "model": name})
    history, batches, started = [], iter(loader), time.time()
    model.train()
    bar = tqdm(range(1, args.steps + 1), desc=name)
    for step in bar:
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, logs = loss_fn({k: v.to(device, non_blocking=True) for k, v in batch.items()}, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if ema is not None:
            update_ema(ema, model, ema_decay)
        if step % args.log_every == 0 or step in (1, args.steps):
            logs = {k: (v if isinstance(v, list) else float(v)) for k, v in logs.items()}
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
    wandb.finish()
    model.eval()
    final = ema if ema is not None else model
    save_model(final, folder)
    atomic_write_text(log_path, json.dumps(history, indent=1))
    print(f"{name}: saved {folder} ({sum(p.numel() for p in final.parameters()) / 1e6:.2f}M parameters, "
          f"{time.time() - started:.0f} s)")
    return final
