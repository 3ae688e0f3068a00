"""Shared helpers of every command: command-line errors, model configs from presets and --set, device and seeding,
atomic writes, model folders, video files, wandb. The training machinery is in training.py.

Everything here is used by more than one script; each mechanism is written once.
"""
import contextlib
import dataclasses
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError


# ----------------------------------------------------------------------------- command-line errors

class UserError(Exception):
    """A mistake in what the user asked for (bad path, bad flag value): reported in one line, exit code 2."""


class TrainingFailed(Exception):
    """Training cannot go on (the loss keeps diverging, the disk is full): one line, exit code 1, and the last good
    training state left as it was."""


def run_cli(main):
    """Run `main()` as a command: a UserError becomes `error: ...` on stderr and exit code 2, a TrainingFailed the same
    with exit code 1, Ctrl-C exit code 130. A torchrun process that succeeded ends in end_torchrun_process.

    Anything else is a bug in this codebase and keeps its traceback.
    """
    try:
        main()
        if dist.is_available() and dist.is_initialized():
            end_torchrun_process()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: nothing was written under the final name", file=sys.stderr)
        sys.exit(130)


def end_torchrun_process():
    """End a torchrun process whose command succeeded without the interpreter's shutdown.

    A gloo worker thread frees a finished collective's work a moment after the caller has seen it done; a work can
    still hold tensors whose Python objects are gone, and freeing those takes the GIL. If that moment falls in the
    interpreter's shutdown, the thread cannot have the GIL and the process aborts (SIGABRT, "terminate called without
    an active exception"; a core dump showed it during the final garbage collection; 2 of 379 two-process CPU launches
    on a busy machine). Here every file is written and all processes meet at a barrier first, so the
    shutdown has nothing left to do.
    """
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


def parse_actions(text, num_actions, names=()):
    """'3,3,1' -> [3, 3, 1], each an action in [0, num_actions); with the game's action names, a name stands for its
    number ('RIGHT,RIGHT,LEFT+UP', any case). UserError otherwise."""
    numbers = {name.upper(): k for k, name in enumerate(names)}
    what = f"integers in [0, {num_actions})" + (f" or action names ({', '.join(names)})" if names else "")
    actions = []
    for item in (a.strip() for a in text.split(",") if a.strip()):
        if item.upper() in numbers:
            actions.append(numbers[item.upper()])
            continue
        try:
            actions.append(int(item))
        except ValueError:
            raise UserError(f"--actions takes comma-separated {what}; {item!r} is neither") from None
    bad = [a for a in actions if not 0 <= a < num_actions]
    if bad or not actions:
        raise UserError(f"--actions takes comma-separated {what}; got {bad or text!r}")
    return actions


def positive(kind):
    """argparse type: a number > 0, so that '--fps 0' is refused by the parser (exit code 2, one line)."""
    def check(text):
        value = kind(text)
        if value <= 0:
            raise ValueError(text)
        return value
    check.__name__ = f"positive {kind.__name__}"
    return check


# ----------------------------------------------------------------------------- model configs

def add_config_flags(parser, presets, what, field="FIELD", example="depth=16 heads=8"):
    """--preset (a named size of `what`, from the model's PRESETS) and --set FIELD=VALUE (any field of its config)."""
    parser.add_argument("--preset", default="default", choices=list(presets),
                        help=f"{what}: model sizes and the training defaults that go with them (default: default)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar=f"{field}=VALUE",
                        help=f"override a field of the model config, e.g. --set {example}; the value is read as JSON "
                             "(numbers, true/false, lists), else as text. The config is saved in the model folder, "
                             "so the model loads with no flags")


def apply_defaults(args, defaults):
    """Fill the flags left unset (None) from `defaults`, the training hyperparameters of the chosen preset."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def override(config, items):
    """A model config (dataclass) with FIELD=VALUE items applied; a bad item is a one-line user error."""
    fields = {f.name for f in dataclasses.fields(config)}
    for item in items:
        name, equals, text = item.partition("=")
        if not equals or not text:
            raise UserError(f"--set takes FIELD=VALUE, not {item!r}")
        if name not in fields:
            raise UserError(f"--set {item}: {type(config).__name__} has no field {name!r}; fields: "
                            f"{', '.join(sorted(fields))}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        current = getattr(config, name)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(current):
            raise UserError(f"--set {item}: {name} takes {type(current).__name__} values, like {json.dumps(current)}")
        config = dataclasses.replace(config, **{name: value})
    return config


def build(cls, config):
    """cls(config), with a config the model refuses (it raises ValueError) reported as a one-line user error."""
    try:
        return cls(config)
    except ValueError as e:
        raise UserError(f"{cls.__name__}: {first_line(e)}") from None


# ----------------------------------------------------------------------------- device and seeds

def box_weights(rows, cols, box, weight, unit):
    """(rows, cols) weights of mean 1: `weight` inside box = [top, left, bottom, right] (in `unit`s of the grid, bottom
    and right exclusive), 1 elsewhere; all 1 with no box. A bad box or weight is a ValueError (build makes it a user's
    error)."""
    weights = torch.ones(rows, cols)
    if box:
        if (len(box) != 4 or not all(isinstance(v, int) for v in box)
                or not 0 <= box[0] < box[2] <= rows or not 0 <= box[1] < box[3] <= cols):
            raise ValueError(f"focus takes [top, left, bottom, right], {unit} of the {rows}x{cols} grid with top < "
                             f"bottom and left < right, not {box}")
        if not weight > 0:
            raise ValueError(f"focus_weight must be positive, not {weight}")
        top, left, bottom, right = box
        weights[top:bottom, left:right] = weight
    return weights / weights.mean()


def nvidia_driver():
    """What nvidia-smi says of the machine's NVIDIA driver, in a few words (to set beside torch's CUDA version)."""
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi: {first_line(e)} (no NVIDIA driver here?)"
    driver, cuda = re.search(r"Driver Version:\s*([\d.]+)", out), re.search(r"CUDA Version:\s*([\d.]+)", out)
    if driver and cuda:
        return f"the NVIDIA driver is {driver[1]}, for CUDA {cuda[1]} at most"
    return f"nvidia-smi: {first_line(out) if out.strip() else 'no output'}"


def choose_device(name, local_rank, world, cuda_count, mps, driver=""):
    """Which device a process runs on -> torch.device, a CUDA one always with its index; UserError when it cannot be.

    name: --device (None: the best there is); local_rank, world: torchrun's LOCAL_RANK and WORLD_SIZE (0, 1 without
    it); cuda_count: the GPUs torch sees; mps: whether Apple's GPU is there. Under torchrun process k takes GPU k
    (LOCAL_RANK) whether --device says cuda or nothing; a single process takes the GPU it is given, cuda:0 by default.
    driver: a few words on the NVIDIA driver for the error when CUDA is asked for and torch sees none.
    """
    if name is None:
        name = "cuda" if cuda_count else "mps" if mps else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (cuda, cuda:N, mps or cpu)") from None
    if device.type != "cuda":
        return device
    if not cuda_count:
        raise UserError(f"--device {name}: torch {torch.__version__}, built for CUDA "
                        f"{torch.version.cuda or 'none (a CPU build)'}, sees no CUDA GPU; {driver or 'check nvidia-smi'}")
    if world > 1 and device.index is not None and device.index != local_rank:
        raise UserError(f"--device {name} under torchrun: each process takes the GPU of its LOCAL_RANK; pass --device "
                        f"cuda, and CUDA_VISIBLE_DEVICES to choose the GPUs")
    index = local_rank if device.index is None else device.index
    if index >= cuda_count:
        raise UserError(f"--device {name}: GPU {index} asked for, {cuda_count} visible")
    return torch.device("cuda", index)


def get_device(name=None, deterministic=False, precision="auto"):
    """The device to run on (choose_device) and made this process's current one, so that every stream, event and
    collective of the process is on it. deterministic: CUDA's deterministic kernels only (training's
    --deterministic), so that a run repeats bit for bit on a GPU as it does on a CPU.
    precision: --precision, what autocast(device) runs the models in from now on (set_precision)."""
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = choose_device(name, int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), cuda_count,
                           getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
                           nvidia_driver() if not cuda_count and str(name).startswith("cuda") else "")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast: TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True
        # the fastest convolution kernel for each shape, found by timing on first use: not the same one every run
        torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs to repeat itself
        torch.use_deterministic_algorithms(True, warn_only=True)
    set_precision(device, precision)
    return device


PRECISIONS = ("auto", "bf16", "fp32")
BF16_DEVICE_TYPES = {"cuda"}  # where autocast(device) runs bf16: CUDA, and the CPU once --precision bf16 asks for it


def set_precision(device, precision):
    """--precision for this process's models on `device`: "auto" is bf16 on CUDA (twice the tensor-core rate of TF32)
    and fp32 elsewhere (bf16 is slower than fp32 on most CPUs); "bf16" on a CPU pays where it has bf16 matrix units
    (Intel AMX, Sapphire Rapids and later: convolutional models 1.2-2.9x faster per step, docs/reference.md); "fp32"
    everywhere."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type == "mps":
        raise UserError("--precision bf16: not on mps (use auto)")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    (BF16_DEVICE_TYPES.add if precision == "bf16" else BF16_DEVICE_TYPES.discard)(device.type)


def autocast(device):
    """The precision every model runs at (set_precision): bf16 autocast or fp32. device: a torch.device or its name."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type in BF16_DEVICE_TYPES)


def add_precision_flag(parser):
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="what the models compute in: auto is bf16 autocast on CUDA and fp32 elsewhere; bf16 also "
                             "on the CPU, where it has bf16 matrix units (Intel AMX: convolutional models 1.2-2.9x faster; "
                             "make demo uses it), fp32 everywhere (default auto)")


def add_step_compile_flag(parser):
    """--compile of the generators (generate.py, play.py, bench.py generate|play): see compile_step."""
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the per-step calls, as CUDA graphs on CUDA (off by default: it takes a "
                             "minute or two to compile, and its gain on a GPU is not measured yet)")


def compile_step(fn, device):
    """torch.compile a per-step inference call: a cached Euler or MaskGIT step, whose shapes and cache addresses stay
    the same at every call (transformer.KVCache). On CUDA as a CUDA graph ("reduce-overhead"): at batch 1 a step is
    hundreds of small kernels, which one graph replay launches at once."""
    return torch.compile(fn, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)


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
    except RuntimeError as e:  # weights of another architecture
        raise UserError(f"cannot load {cls.__name__} from {folder_or_repo}: {first_line(e)} (made by another "
                        f"version of the model? train it again)") from None
    return model.to(device).eval()


# ----------------------------------------------------------------------------- video files

def from_uint8(frames):
    """uint8 frames (..., C, H, W), as the stores hand them out -> float in [-1, 1], on their device. The loaders
    move bytes (a quarter of float32's) and the device converts."""
    return frames.float() / 127.5 - 1


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
