"""Frame stores, and the windows of consecutive frames that training reads from them.

A frame store is a folder:
  frames.u8    uint8 frames (count, height, width, 3), RGB, raw row-major bytes read through a memory map
               (never loaded whole into RAM); its size must equal count * height * width * 3
  actions.npy  int64 (count,), only for game collectors: actions[i] is the action taken on seeing frame i, so the
               transition frame i -> frame i+1 is caused by actions[i]
  meta.json    source, fps, height, width, count, episode_starts (first frame of each episode, ascending, from 0),
               levels (one per episode, or null), num_actions and action_names (or null), and how it was made

A latent store holds a frame store encoded by the ViT-VAE (vae2.py), for the DiT:
  mu.f16       float16 posterior means (count, N, L) = (count, 220, 48), raw bytes read through a memory map
  logvar.f16   float16 posterior log-variances, the same shape
  actions.npy  copied from the frame store, if it has one
  meta.json    the frame store's meta plus latent_shape [N, L], scale (1 / std of mu over the store: the DiT
               multiplies latents by it to get unit variance), vae (its folder), vae_id (changes with its weights)
               and frames (the frame store's path)

A token store holds a frame store as the Genie dynamics model reads it (train_genie.py writes it beside the models):
  tokens.u16          uint16 tokenizer tokens (count, rows, cols)
  latent_actions.npy  int64 (count,): latent_actions[i] is the LAM's action for the transition frame i -> frame i+1
                      (0 at an episode's last frame, which starts no transition); only when a LAM labelled them
  actions.npy         copied from the frame store, if it has one
  meta.json           the frame store's meta plus grid [rows, cols], tokenizer_id and lam_id (model_id of each; lam_id
                      "" without labels) and frames (the frame store's path)

Windows come out as (T, C, H, W) uint8 frames from a frame store (for Celeste footage C, H, W = 3, 180, 320; the
device makes them floats in [-1, 1]), as (T, N, L) float16 mu and logvar from a latent store, as (T, rows, cols) tokens
and the T - 1 latent and true actions between them from a token store.

  python dataset.py prepare videos/z8r255LoVJc.mp4 --fps 12 --size 320x180     # -> videos/z8r255LoVJc_12fps_320x180/
  python dataset.py info videos/coinrun
  python dataset.py preview videos/coinrun --frames 300 --out results/coinrun.mp4
  python dataset.py encode videos/z8r255LoVJc_12fps_320x180 --vae models/vae2  # -> videos/..._320x180_latents/
"""
import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils import UserError, atomic_dir, atomic_path, autocast, first_line, from_uint8, get_device, load_model, parse_size, positive, run_cli, write_gif, \
    write_mp4
from vae2 import ViTVAE

FRAMES, ACTIONS, META, MU, LOGVAR = "frames.u8", "actions.npy", "meta.json", "mu.f16", "logvar.f16"
TOKENS, LATENT_ACTIONS = "tokens.u16", "latent_actions.npy"


# ----------------------------------------------------------------------------- the store

class Store:
    """What frame stores and latent stores share: episodes, the true actions, and memory maps opened lazily, so that
    a store pickled into DataLoader workers sends only its path."""

    def open(self, path, kind):
        """Read meta.json (checked by read_meta) and what every store has: count, episodes, levels, fps."""
        self.path, self._maps = Path(path), {}
        self.meta = read_meta(self.path, kind)
        self.count, self.episode_starts, self.levels, self.fps = (self.meta[k] for k in
                                                                  ("count", "episode_starts", "levels", "fps"))

    def memmap(self, name, dtype, item_shape):  # (count, *item_shape), opened on first use
        if name not in self._maps:
            self._maps[name] = np.memmap(self.path / name, dtype, "r", shape=(self.count, *item_shape))
        return self._maps[name]

    @property
    def actions(self):  # (count,) int64, or None
        if self.has_actions and ACTIONS not in self._maps:
            self._maps[ACTIONS] = np.load(self.path / ACTIONS, mmap_mode="r")
        return self._maps.get(ACTIONS)

    @property
    def action_names(self):  # the game's name of each true action; their numbers where the collector named none
        return self.meta.get("action_names") or [str(a) for a in range(self.meta["num_actions"])]

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}

    def __len__(self):
        return self.count

    def episodes(self):
        """[(start, end), ...]: the frame range of each episode, end exclusive."""
        return list(zip(self.episode_starts, self.episode_starts[1:] + [self.count]))

    def turns(self):
        """(count,) bool: the transitions (frame k -> k + 1, under action k) where the player turns round: a
        horizontal action (action_effect) opposite to the last horizontal one of its episode. A random policy that
        holds its actions turns seldom (CoinRun: 5 % of transitions), yet a turn is where a world shows that it
        follows its keys."""
        horizontal = effect_classes(self.action_names, self.meta["source"])[2][np.asarray(self.actions)]  # 0 left, 2 right
        turned = np.zeros(self.count, bool)
        for start, end in self.episodes():
            facing = 1  # no horizontal action yet
            for k in range(start, end):
                if horizontal[k] != 1:
                    turned[k] = facing != 1 and horizontal[k] != facing
                    facing = horizontal[k]
        return turned


def action_effect(name, source):
    """What a game action does on screen, read from its name -> (horizontal direction, effect class name).

    procgen (source 'procgen:...'): left/none/right x jump or not: 'LEFT+UP' -> ('left', 'left + jump'); DOWN and the
    letter keys change nothing a player of most procgen games sees, so they count as none.
    ALE: the directions and fire in the name: 'UPRIGHTFIRE' -> ('right', 'up + right + fire')."""
    parts = set(re.findall(r"LEFT|RIGHT|UP|DOWN|FIRE", name))
    horizontal = "left" if "LEFT" in parts else "right" if "RIGHT" in parts else "none"
    if source.startswith("procgen:"):
        words = ["jump"] if "UP" in parts else []
        words = ([horizontal] if horizontal != "none" else []) + words
    else:
        words = [w.lower() for w in ("UP", "DOWN", "LEFT", "RIGHT", "FIRE") if w in parts]
    return horizontal, " + ".join(words) or "none"


def effect_classes(names, source):
    """The effect classes of a game's actions named `names` -> (class names in order of first appearance, each
    action's class (A,), each action's horizontal direction (A,): 0 left, 1 none, 2 right)."""
    effects = [action_effect(n, source) for n in names]
    classes = list(dict.fromkeys(e for _, e in effects))
    return (classes, np.array([classes.index(e) for _, e in effects]),
            np.array([("left", "none", "right").index(h) for h, _ in effects]))


class FrameStore(Store):
    """A frame store opened for reading. Every file is checked against meta.json when it is opened."""

    def __init__(self, path):
        self.open(path, "frame store")
        try:
            self.height, self.width = int(self.meta["height"]), int(self.meta["width"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{self.path / META} is malformed: {type(e).__name__} {e}") from None
        check_size(self.path / FRAMES, self.count * self.height * self.width * 3,
                   f"{self.count} frames of {self.height}x{self.width}x3")
        self.has_actions = check_actions(self.path, self.count)

    @property
    def frames(self):  # (count, H, W, 3) uint8
        return self.memmap(FRAMES, np.uint8, (self.height, self.width, 3))

    def window(self, start, length):
        """{"frames": (T, C, H, W) uint8 (utils.from_uint8 makes them floats), "actions": (T,) int64 if the store
        has actions}."""
        frames = torch.from_numpy(np.array(self.frames[start:start + length]))  # (T, H, W, C) uint8
        item = {"frames": frames.permute(0, 3, 1, 2).contiguous()}  # (T, C, H, W)
        if self.has_actions:
            item["actions"] = torch.from_numpy(np.array(self.actions[start:start + length], dtype=np.int64))
        return item


def read_meta(path, kind):
    """meta.json of a store folder, with count, episode_starts, levels and fps checked and converted."""
    if not (path / META).is_file():
        raise UserError(f"{path} is not a {kind} (no {META})")
    try:
        meta = json.loads((path / META).read_text())
        meta["count"] = int(meta["count"])
        meta["episode_starts"] = [int(s) for s in meta["episode_starts"]]
        meta["levels"] = meta.get("levels")
        meta["fps"] = float(meta["fps"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path / META} is malformed: {type(e).__name__} {e}") from None
    check_meta(path, meta)
    return meta


def check_size(file, expected, what):
    size = file.stat().st_size if file.is_file() else -1
    if size != expected:
        raise UserError(f"{file} holds {size} bytes but meta.json describes {what} = {expected} bytes "
                        f"(truncated or foreign file?)")


def check_actions(path, count):
    """Whether the store at `path` has actions.npy; UserError if it does not match `count` frames."""
    if not (path / ACTIONS).exists():
        return False
    try:
        actions = np.load(path / ACTIONS, mmap_mode="r")
    except ValueError as e:
        raise UserError(f"{path / ACTIONS} is unreadable: {e}") from None
    if actions.shape != (count,):
        raise UserError(f"{path / ACTIONS} has shape {actions.shape}, meta.json says {count} frames")
    return True


def check_meta(path, meta):
    """Raise UserError if meta.json contradicts itself."""
    count, starts, levels = meta["count"], meta["episode_starts"], meta.get("levels")
    if count <= 0:
        raise UserError(f"{path} holds no frames")
    if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= count:
        raise UserError(f"{path}: episode_starts must ascend from 0 and stay below count={count}")
    if levels is not None and len(levels) != len(starts):
        raise UserError(f"{path}: {len(levels)} levels for {len(starts)} episodes")


class FrameWriter:
    """Writes the frames of a store being built, at any position: positioned writes, not a memory map, so the
    collector's RAM stays flat however many frames it writes."""

    def __init__(self, folder, count, height, width):
        self.frame_bytes = height * width * 3
        self.file = open(Path(folder) / FRAMES, "wb")
        self.file.truncate(count * self.frame_bytes)

    def write(self, positions, frames):  # positions (N,), frames (N, H, W, 3) uint8
        for position, frame in zip(positions, frames):
            os.pwrite(self.file.fileno(), np.ascontiguousarray(frame).data, int(position) * self.frame_bytes)

    def close(self):
        self.file.close()


def write_meta(folder, **meta):
    """Write meta.json for a store being built in `folder` (a temporary folder from utils.atomic_dir)."""
    meta.setdefault("levels", None)
    meta.setdefault("num_actions", None)
    meta.setdefault("action_names", None)
    check_meta(folder, meta)
    (Path(folder) / META).write_text(json.dumps(meta, indent=1))


# ----------------------------------------------------------------------------- videos -> store

VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".flv", ".ts"}
FITS = ("crop", "pad", "stretch")


def ffmpeg_exe():
    """The ffmpeg binary imageio-ffmpeg ships (with libx264 and every common decoder)."""
    import imageio_ffmpeg
    return imageio_ffmpeg.get_ffmpeg_exe()


def list_videos(path):
    """The video files `prepare` takes from a path: the file itself, or the videos in a folder, by name."""
    path = Path(path)
    if path.is_dir():
        videos = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
        if not videos:
            raise UserError(f"{path} is a folder with no video in it ({', '.join(sorted(VIDEO_SUFFIXES))}) and no "
                            f"{META} (not a store)")
        return videos
    if not path.is_file():
        raise UserError(f"video {path} does not exist")
    return [path]


def probe(video):
    """{"width", "height", "fps", "duration"} of a video's first video stream, from ffmpeg's description of the
    file; UserError for what is not a video (empty, no header, another format, audio only, no stream at all)."""
    if video.stat().st_size == 0:
        raise UserError(f"video {video} is empty")
    text = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(video)], capture_output=True,
                          text=True, errors="replace").stderr
    if "Input #0" not in text:
        raise UserError(f"{video} is not a video ffmpeg can decode (missing header, truncated or another format)")
    streams = [line for line in text.splitlines() if re.search(r"Stream #\S+: Video:", line)
               and "(attached pic)" not in line]
    if not streams:
        what = "audio only" if re.search(r"Stream #\S+: Audio:", text) else "no stream at all: zero duration?"
        raise UserError(f"{video} holds no video stream ({what})")
    size = re.search(r", (\d+)x(\d+)", streams[0])
    rate = re.search(r"([\d.]+) (?:fps|tbr)", streams[0])
    duration = re.search(r"Duration: (\d+):(\d+):([\d.]+)", text)
    seconds = int(duration[1]) * 3600 + int(duration[2]) * 60 + float(duration[3]) if duration else 0.0
    return {"width": int(size[1]), "height": int(size[2]), "fps": float(rate[1]) if rate else None,
            "duration": seconds}


def detect_borders(video, info):
    """[w, h, x, y]: the picture inside black letterbox/pillarbox bars, or None when there are none. A row or column
    is bar when no keyframe ever has two pixels in it brighter than dark grey. (ffmpeg's cropdetect compares a row's
    mean instead, and so crops into games drawn on black, where a row may hold only a paddle.)"""
    width, height = info["width"], info["height"]
    process = subprocess.Popen([ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-skip_frame", "nokey",
                                "-i", str(video), "-map", "0:v:0", "-vf", "format=gray", "-f", "rawvideo", "pipe:1"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    brightest = np.zeros((height, width), np.uint8)  # over the keyframes: RAM flat in the video's length
    while len(frame := process.stdout.read(width * height)) == width * height:
        np.maximum(brightest, np.frombuffer(frame, np.uint8).reshape(height, width), out=brightest)
    process.wait()
    picture = brightest > 40  # luma: black is 16 (video range) or 0
    rows, cols = np.flatnonzero(picture.sum(1) >= 2), np.flatnonzero(picture.sum(0) >= 2)
    if len(rows) == 0 or len(cols) == 0:
        return None
    x, y = cols[0] // 2 * 2, rows[0] // 2 * 2  # even, for 4:2:0 chroma
    w, h = (cols[-1] + 2 - x) // 2 * 2, (rows[-1] + 2 - y) // 2 * 2
    return None if (w, h) == (width, height) else [int(w), int(h), int(x), int(y)]


def video_filter(fps, size, fit, crop):
    """ffmpeg's filter chain from a decoded video to the store's frames, cheapest work first.

    Output frame k must show the source frame nearest to k / fps. ffmpeg's fps filter shows at slot k the last frame
    whose rounded timestamp is <= k; moving each frame's timestamp to the midpoint between it and the frame before
    (the first to 0), and rounding up, makes that exactly the nearest frame, for any (variable) rate. The time base is
    halved first so the midpoints are whole ticks. The last frame would end halfway through its duration, so two
    copies of it follow (decode_into cuts the store at the video's true end). Frames are dropped before anything
    is cropped or scaled."""
    width, height = size
    chain = ["tpad=stop=2:stop_mode=clone", "settb=intb/2", "setpts='if(eq(N,0),0,(PTS+PREV_INPTS)/2-STARTPTS)'",
             f"fps={fps}:round=up:start_time=0"]
    if crop:
        chain.append("crop={}:{}:{}:{}".format(*crop))
    sar = "if(gt(sar,0),sar,1)"  # display aspect of one pixel (0 when the file does not say: square)
    if fit == "crop":  # the centred part with the target's aspect
        chain.append(f"crop=w='min(iw,ih*{width}/{height}/{sar})':h='min(ih,iw*{sar}*{height}/{width})'")
    if fit == "pad":  # all of it, with black bars
        chain += [f"scale={width}:{height}:force_original_aspect_ratio=decrease:flags=area",
                  f"pad={width}:{height}:-1:-1"]
    else:
        chain.append(f"scale={width}:{height}:flags=area")
    return ",".join(chain + ["format=rgb24"])


def count_packets(video, listing):
    """Start listing the video's packets (timestamp, duration) into the file `listing`, reading without decoding;
    frame_count reads it once the process ends."""
    return subprocess.Popen([ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", str(video),
                             "-map", "0:v:0", "-c", "copy", "-f", "framecrc", str(listing)])


def frame_count(listing, fps):
    """(frames the store gets, frames the video has) from count_packets' listing: every output time k / fps before
    the end of the video's last frame (its timestamp plus its duration)."""
    lines = Path(listing).read_text() if Path(listing).is_file() else ""
    time_base = re.search(r"#tb 0: (\d+/\d+)", lines)
    packets = [line.split(",") for line in lines.splitlines() if line and not line.startswith("#")]
    if time_base is None or not packets:
        return 0, 0
    pts = [int(p[2]) for p in packets]
    end = (max(pts) - min(pts) + max(int(packets[pts.index(max(pts))][3]), 1)) * Fraction(time_base[1])
    return math.ceil(end * Fraction(fps).limit_denominator(1001000)), len(packets)


def decode_into(file, video, info, fps, size, fit, crop, bar):
    """Append `video`'s frames to the open `file` (one ffmpeg process writing raw RGB straight into it, decoding on
    every core); returns (frames written, source frames). UserError if the video ends early."""
    frame_bytes, before = size[0] * size[1] * 3, file.tell()
    listing = Path(file.name).with_name("packets.txt")
    counter = count_packets(video, listing)  # alongside the decoding: it reads the file, the decoder computes
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-nostats", "-progress", "pipe:2", "-i",
           str(video), "-map", "0:v:0", "-vf", video_filter(fps, size, fit, crop), "-f", "rawvideo", "pipe:1"]
    process = subprocess.Popen(cmd, stdout=file, stderr=subprocess.PIPE, text=True, errors="replace")
    log, done = [], 0
    for line in process.stderr:
        if progress := re.fullmatch(r"frame=(\d+)\n?", line):
            bar.update(int(progress[1]) - done)
            done = int(progress[1])
        elif not re.match(r"\w+=", line):
            log = (log + [line.strip()])[-20:]
    if process.wait() != 0:
        raise UserError(f"ffmpeg could not decode {video}: {first_line(log[-1] if log else 'no message')}")
    counter.wait()
    expected, source_frames = frame_count(listing, fps)
    listing.unlink(missing_ok=True)
    file.seek(0, os.SEEK_END)
    count, rest = divmod(file.tell() - before, frame_bytes)
    if rest or count == 0:
        raise UserError(f"no frame could be decoded from {video} (empty or damaged video)")
    # A truncated file decodes without error up to the damage: refuse it rather than store part of it unnoticed.
    if count / fps < 0.98 * info["duration"] - 2 / fps - 1 / (info["fps"] or fps):
        raise UserError(f"{video} ends after {count / fps:.1f} s of its {info['duration']:.1f} s ({count} frames at "
                        f"{fps:g} fps; truncated or damaged: download it again)")
    if count > expected > 0:  # the copies of the last frame that run past the video's end
        file.truncate(before + expected * frame_bytes)
        file.seek(0, os.SEEK_END)
        bar.update(expected - count)
        count = expected
    return count, source_frames


def prepare(videos, out, fps=12.0, size=(320, 180), fit="crop", crop=None):
    """Decode videos (a path, or a list of paths: files or folders of videos) into one frame store at `out`, each
    video an episode, resampled to `fps` and resized to `size` (W, H) in ffmpeg.

    Output frame k of a video shows its source frame nearest to k / fps, so any source rate works (29.97, variable,
    or lower than `fps`). `fit`: what to do when the aspect differs from the target's (crop the centre, pad with
    black, stretch); `crop="auto"` first removes black letterbox/pillarbox bars. Frames stream from ffmpeg to disk:
    RAM does not grow with the videos' length.
    """
    if fit not in FITS:
        raise UserError(f"--fit must be one of {', '.join(FITS)}, not {fit!r}")
    if crop not in (None, "auto"):
        raise UserError(f"--crop must be auto (or left out), not {crop!r}")
    paths = [videos] if isinstance(videos, (str, Path)) else list(videos)
    videos = [video for path in paths for video in list_videos(path)]
    infos = [probe(v) for v in videos]
    width, height = size
    parts, episode_starts, count = [], [], 0
    with atomic_dir(out) as tmp, open(tmp / FRAMES, "wb+", buffering=0) as file, \
            tqdm(total=round(sum(i["duration"] for i in infos) * fps), unit="frame", desc="prepare") as bar:
        for video, info in zip(videos, infos):
            borders = detect_borders(video, info) if crop == "auto" else None
            frames, source_frames = decode_into(file, video, info, fps, size, fit, borders, bar)
            episode_starts.append(count)
            count += frames
            parts.append({"path": str(video.resolve()), "width": info["width"], "height": info["height"],
                          "fps": info["fps"], "duration": info["duration"], "source_frames": source_frames,
                          "frames": frames, "crop": borders})
        file.flush()
        write_meta(tmp, source=" ".join(map(str, paths)), fps=fps, height=height,
                   width=width, count=count, episode_starts=episode_starts, fit=fit, crop=crop, videos=parts)
    return FrameStore(out)


def require_size(store, width, height):
    """UserError unless the store's frames are width x height, the size a model takes, with how to make such a store."""
    if (store.width, store.height) != (width, height):
        raise UserError(f"{store.path} holds {store.width}x{store.height} frames; the model takes {width}x{height} "
                        f"(make a store of that size: `python dataset.py prepare VIDEO --size {width}x{height}` or "
                        f"`python download.py procgen:coinrun --size {width}x{height}`)")


def open_frames(data, fps=12.0, size=(320, 180)):
    """A training script's DATA: a store folder, or a video or a folder of videos, prepared on first use into
    <data>_<fps>fps_<W>x<H>/ beside it (again when the videos in the folder change)."""
    data = Path(data)
    if (data / META).is_file():
        return FrameStore(data)
    videos = [str(v.resolve()) for v in list_videos(data)]
    cached = data.parent / f"{data.stem if data.is_file() else data.name}_{fps:g}fps_{size[0]}x{size[1]}"
    if cached.is_dir():
        try:
            store = FrameStore(cached)
            if [v["path"] for v in store.meta.get("videos", [])] == videos:
                return store
        except UserError:  # an unusable cache is rebuilt rather than trusted
            pass
    return prepare(data, cached, fps, size)


# ----------------------------------------------------------------------------- latent stores

class LatentStore(Store):
    """A latent store opened for reading (`encode` writes one). Every file is checked against meta.json."""

    def __init__(self, path):
        self.open(path, "latent store")
        try:
            self.latent_shape = tuple(int(n) for n in self.meta["latent_shape"])
            self.scale = float(self.meta["scale"])
            self.vae_id = str(self.meta["vae_id"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{self.path / META} is malformed: {type(e).__name__} {e}") from None
        if len(self.latent_shape) != 2 or not (math.isfinite(self.scale) and self.scale > 0):
            raise UserError(f"{self.path / META}: latent_shape must be [N, L] and scale a positive number")
        for name in (MU, LOGVAR):
            check_size(self.path / name, self.count * math.prod(self.latent_shape) * 2,
                       f"{self.count} latents of {self.latent_shape} float16")
        self.has_actions = check_actions(self.path, self.count)
        self.latent_actions = None  # a labels file of open_latent_actions, once attached

    @property
    def mu(self):  # (count, N, L) float16
        return self.memmap(MU, np.float16, self.latent_shape)

    @property
    def logvar(self):  # (count, N, L) float16
        return self.memmap(LOGVAR, np.float16, self.latent_shape)

    def window(self, start, length):
        """{"mu", "logvar": (T, N, L) float16, as stored (the device makes them float32), "actions": (T,) int64 if
        the store has actions, "latent_actions": (T,) int64, a LAM's, once open_latent_actions attached them}."""
        item = {"mu": torch.from_numpy(np.array(self.mu[start:start + length])),
                "logvar": torch.from_numpy(np.array(self.logvar[start:start + length]))}
        if self.has_actions:
            item["actions"] = torch.from_numpy(np.array(self.actions[start:start + length], dtype=np.int64))
        if self.latent_actions is not None:
            if self.latent_actions not in self._maps:
                self._maps[self.latent_actions] = np.load(self.latent_actions, mmap_mode="r")
            item["latent_actions"] = torch.from_numpy(np.array(self._maps[self.latent_actions][start:start + length]))
        return item


class TokenStore(Store):
    """A token store opened for reading (train_genie.tokenize writes one)."""

    def __init__(self, path):
        self.open(path, "token store")
        try:
            self.grid = tuple(int(n) for n in self.meta["grid"])
            self.tokenizer_id, self.lam_id = str(self.meta["tokenizer_id"]), str(self.meta["lam_id"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{self.path / META} is malformed: {type(e).__name__} {e}") from None
        check_size(self.path / TOKENS, self.count * math.prod(self.grid) * 2, f"{self.count} token grids of {self.grid}")
        self.has_actions = check_actions(self.path, self.count)

    @property
    def tokens(self):  # (count, rows, cols) uint16
        return self.memmap(TOKENS, np.uint16, self.grid)

    @property
    def latent_actions(self):  # (count,) int64
        if LATENT_ACTIONS not in self._maps:
            self._maps[LATENT_ACTIONS] = np.load(self.path / LATENT_ACTIONS, mmap_mode="r")
        return self._maps[LATENT_ACTIONS]

    def window(self, start, length):
        """{"tokens": (T, rows, cols) int64, "latent_actions": (T - 1,) int64, those of the transitions between, when
        a LAM labelled them, "actions": (T - 1,) int64, the true ones, when the frame store has them}."""
        item = {"tokens": torch.from_numpy(self.tokens[start:start + length].astype(np.int64))}
        if self.lam_id:
            item["latent_actions"] = torch.from_numpy(np.array(self.latent_actions[start:start + length - 1]))
        if self.has_actions:
            item["actions"] = torch.from_numpy(np.array(self.actions[start:start + length - 1], dtype=np.int64))
        return item


def open_store(path):
    """A frame store or a latent store, whichever the folder holds."""
    return LatentStore(path) if (Path(path) / MU).exists() else FrameStore(path)


def model_id(folder):
    """A short hash of a local model folder's weights and config: a latent or token store made with other weights is
    stale."""
    if not Path(folder).is_dir():
        raise UserError(f"model folder {folder} does not exist")
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        if not (Path(folder) / name).is_file():
            raise UserError(f"{folder} is not a model folder (no {name})")
        with open(Path(folder) / name, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def latents_folder(store_path):
    """Where a frame store's latents go by default: beside it, <store>_latents."""
    store_path = Path(store_path)
    return store_path.parent / f"{store_path.name}_latents"


@torch.no_grad()
def encode(store, vae_folder, out, device, batch_size=64):
    """Encode every frame of `store` (a FrameStore) with the VAE in `vae_folder` into a latent store at `out`."""
    vae = load_model(ViTVAE, vae_folder, device)
    c = vae.config
    require_size(store, c.width, c.height)
    shape = (store.count, c.tokens, c.latent_dim)
    print(f"encoding the {store.count} frames of {store.path} with {vae_folder} into {out}")
    total, total_sq = 0.0, 0.0  # float64 sums of mu and mu^2, for the store's std
    with atomic_dir(out) as tmp:
        mu_file = np.memmap(tmp / MU, np.float16, "w+", shape=shape)
        logvar_file = np.memmap(tmp / LOGVAR, np.float16, "w+", shape=shape)
        for start in tqdm(range(0, store.count, batch_size), unit="batch", desc=f"encode {store.path.name}"):
            frames = from_uint8(store.window(start, batch_size)["frames"].to(device))  # (B, 3, H, W)
            with autocast(device):  # bf16 on CUDA, as generate.py encodes its prompts
                mu, logvar = (t.float() for t in vae.encode(frames))  # (B, N, L) each
            mu_file[start:start + len(mu)] = mu.cpu().numpy().astype(np.float16)
            logvar_file[start:start + len(mu)] = logvar.cpu().numpy().astype(np.float16)
            total += mu.double().sum().item()
            total_sq += mu.double().pow(2).sum().item()
        mu_file.flush()
        logvar_file.flush()
        del mu_file, logvar_file
        if store.has_actions:
            shutil.copyfile(store.path / ACTIONS, tmp / ACTIONS)
        numbers = math.prod(shape)
        std = math.sqrt(max(total_sq / numbers - (total / numbers) ** 2, 1e-12))
        # absolute paths: train_dit.py finds the frames behind the latents from any working directory
        meta = {**store.meta, "latent_shape": [c.tokens, c.latent_dim], "scale": 1 / std,
                "vae": str(Path(vae_folder).resolve()), "vae_id": model_id(vae_folder), "frames": str(store.path.resolve())}
        write_meta(tmp, **meta)
    return LatentStore(out)


def open_latents(data, vae_folder, device, batch_size=64):
    """A DiT's DATA: a latent store (checked against the VAE's weights), or a frame store or video whose latents are
    encoded once into <store>_latents beside it and reused until the VAE's weights change."""
    current = model_id(vae_folder)
    if (Path(data) / MU).exists():
        latents = LatentStore(data)
        if latents.vae_id != current:
            raise UserError(f"{data} was encoded by another VAE than the one in {vae_folder} now (vae_id "
                            f"{latents.vae_id} != {current}); re-encode it: python dataset.py encode "
                            f"{latents.meta.get('frames', 'STORE')} --vae {vae_folder}")
        return latents
    store = open_frames(data)
    cached = latents_folder(store.path)
    if (cached / META).is_file():
        try:
            latents = LatentStore(cached)
            if latents.vae_id == current and latents.count == store.count:
                return latents
        except UserError:  # an unusable cache is rebuilt rather than trusted
            pass
    return encode(store, vae_folder, cached, device, batch_size)


def label_transitions(store, infer, clip_len, clip, batch_size=64):
    """A LAM's action for every transition of `store` -> int64 (count,), 0 at an episode's last frame (it starts no
    transition). Each episode is cut into clips of clip_len frames that overlap by one, so each transition is labelled
    once, having seen the frames of its clip up to it, as in the LAM's training. clip(start, length) -> the LAM's
    input for one clip on its device; infer(clips) -> (B, length - 1) actions."""
    clips = {}  # clip length -> first frames
    for first, end in store.episodes():
        for start in range(first, end - 1, clip_len - 1):
            clips.setdefault(min(clip_len, end - start), []).append(start)
    actions = np.zeros(store.count, np.int64)
    for length, starts in clips.items():
        for i in tqdm(range(0, len(starts), batch_size), unit="batch", desc=f"latent actions ({length} frames)"):
            chunk = starts[i:i + batch_size]
            for start, row in zip(chunk, infer(torch.stack([clip(s, length) for s in chunk])).cpu().numpy()):
                actions[start:start + length - 1] = row
    return actions


@torch.no_grad()
def open_latent_actions(latents, lam_folder, device, clip_len, batch_size=64):
    """Attach to the latent store `latents` the actions of the LAM in lam_folder (train_lam.py) for every
    transition: labelled once into latent_actions_<lam id>_<clip_len>.npy in the store and read from there while the
    LAM's weights stay the same; the store's windows then carry them as "latent_actions". Returns the LAM."""
    from lam import LatentActionModel
    action_model = load_model(LatentActionModel, lam_folder, device)
    c = action_model.config
    if c.input != "latents" or (c.rows * c.cols, c.latent_dim) != latents.latent_shape:
        raise UserError(f"{lam_folder} is not a LAM of these latents: it takes {c.input} "
                        f"{'' if c.input != 'latents' else (c.rows * c.cols, c.latent_dim)}, the store holds latents of "
                        f"{latents.latent_shape}; train one on them: python train_lam.py {latents.path} --vae VAE")
    path = latents.path / f"{Path(LATENT_ACTIONS).stem}_{model_id(lam_folder)}_{clip_len}.npy"
    if not path.is_file():
        def clip(start, length):  # posterior means, scaled as the LAM was trained on them
            return torch.from_numpy(np.array(latents.mu[start:start + length], np.float32)).to(device) * latents.scale
        with autocast(device):
            actions = label_transitions(latents, action_model.infer_actions, clip_len, clip, batch_size)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, actions)
    latents.latent_actions = path
    return action_model


# ----------------------------------------------------------------------------- windows

def held_out(key, fraction):
    """Deterministic pseudo-random choice of held-out episodes/levels (Knuth's multiplicative hash)."""
    return (int(key) * 2654435761 % 2**32) / 2**32 < fraction


def split_episodes(store, split, fraction=0.1):
    """Frame ranges of `split` ('train', 'val' or 'all'). Procgen stores split by level, so held-out levels are never
    seen in training; other stores by episode (a store of several videos: whole videos, at least one); a single
    long video by time (its last `fraction` is held out)."""
    episodes = store.episodes()
    if split == "all":
        return episodes
    if len(episodes) == 1:
        start, end = episodes[0]
        cut = start + round((end - start) * (1 - fraction))
        return [(start, cut)] if split == "train" else [(cut, end)]
    keys = store.levels if store.levels is not None else range(len(episodes))
    val = [held_out(key, fraction) for key in keys]
    if not any(val) and store.levels is None:  # a few videos: the hash may pick none, and validation needs one
        val[-1] = True
    return [ep for ep, is_val in zip(episodes, val) if is_val == (split == "val")]


def spread_frames(store, split, count):
    """Indices of `count` frames spread evenly over the frames of `split` (all of them if it holds fewer)."""
    index = np.concatenate([np.arange(s, e) for s, e in split_episodes(store, split)] + [np.zeros(0, np.int64)])
    return index[np.linspace(0, len(index) - 1, count).round().astype(int)] if len(index) > count else index


class WindowDataset(torch.utils.data.Dataset):
    """Windows of `seq_len` consecutive frames that never cross an episode boundary, from a frame or latent store
    (or the path of one).

    Item from a frame store: {"frames": (T, C, H, W) uint8, "actions": (T,) int64 (if the store has actions)}; from
    a latent store: {"mu", "logvar": (T, N, L) float16, "actions"}. actions[k] is the true action
    taken at frame k, so frames[k] -> frames[k + 1] is caused by actions[k].
    """

    def __init__(self, store, seq_len, split="train", held_out_fraction=0.1, stride=1):
        self.store = store if isinstance(store, Store) else open_store(store)
        self.seq_len = seq_len
        ranges = split_episodes(self.store, split, held_out_fraction)
        starts = [np.arange(s, e - seq_len + 1, stride) for s, e in ranges if e - s >= seq_len]
        if not starts:
            raise UserError(f"the {split} split of {self.store.path} has no episode of {seq_len} frames or more")
        self.starts = np.concatenate(starts)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        return self.store.window(int(self.starts[i]), self.seq_len)

    def oversample(self, marked, times):
        """Draw each window that holds a marked transition (marked: (count,) bool over the store's transitions, k for
        frame k -> k + 1) `times` times as often as the others. Returns the dataset."""
        seen = np.concatenate([[0], np.cumsum(marked)])  # marked transitions before each frame
        holds = seen[self.starts + self.seq_len - 1] > seen[self.starts]
        self.starts = np.concatenate([self.starts] + [self.starts[holds]] * (times - 1))
        return self


# ----------------------------------------------------------------------------- command line

def describe(store):
    """A few lines on what a store holds."""
    lengths = np.diff(store.episode_starts + [store.count])
    lines = [f"store       {store.path}", f"source      {store.meta['source']}"]
    if isinstance(store, LatentStore):
        n, l = store.latent_shape
        lines += [f"latents     {store.count} x ({n}, {l}) float16, mu and logvar = "
                  f"{2 * store.count * n * l * 2 / 2**30:.2f} GiB, scale {store.scale:.4g}",
                  f"encoded     from {store.meta['frames']} by {store.meta['vae']} (vae_id {store.vae_id})"]
    else:
        lines.append(f"frames      {store.count} x (3, {store.height}, {store.width}) uint8 = "
                     f"{store.count * store.height * store.width * 3 / 2**30:.2f} GiB")
    for video in store.meta.get("videos") or []:
        crop = "bars cropped to {}x{} at {},{}; ".format(*video["crop"]) if video["crop"] else ""
        lines.append(f"video       {Path(video['path']).name}: {video['width']}x{video['height']} at "
                     f"{video['fps'] or 0:g} fps, {video['duration']:.1f} s, {video['source_frames']} frames decoded "
                     f"-> {video['frames']} ({crop}fit {store.meta['fit']})")
    lines += [f"fps         {store.fps:g} ({store.count / store.fps / 3600:.2f} h)",
              f"episodes    {len(lengths)}, length min/mean/max {lengths.min()}/{lengths.mean():.1f}/{lengths.max()}"]
    if store.levels is not None:
        lines.append(f"levels      {len(set(store.levels))} distinct")
    if store.has_actions:
        actions = np.asarray(store.actions)
        names = store.action_names
        held = len(actions) / (1 + np.count_nonzero(np.diff(actions)))
        counts = np.bincount(actions, minlength=len(names))
        lines.append(f"actions     {len(names)} kinds, held {held:.1f} steps on average")
        lines += [f"  {a:2d} {names[a]:<12s} {c / len(actions):6.1%}" for a, c in enumerate(counts) if c]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description="Frame stores: make one from a video, describe one, preview one, "
                                                 "encode one into a latent store.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="decode videos into one frame store (resampled by timestamp, resized, one "
                                       "episode per video), in ffmpeg")
    p.add_argument("videos", nargs="+", metavar="VIDEO",
                   help="video files (mp4, webm, mkv, mov, ...) or folders of them; each video becomes an episode")
    p.add_argument("--fps", type=positive(float), default=12.0, help="frames per second of the store (default 12)")
    p.add_argument("--size", default="320x180", help="WIDTHxHEIGHT of the stored frames (default 320x180)")
    p.add_argument("--fit", default="crop", help="a source of another aspect ratio: crop its centre (default), pad "
                                                 "it with black bars, or stretch it")
    p.add_argument("--crop", help="auto: first remove black letterbox/pillarbox bars (found by ffmpeg's cropdetect)")
    p.add_argument("--out", help="store folder (default: beside the video or folder, <name>_<fps>fps_<W>x<H>; "
                                 "required for several)")
    p = sub.add_parser("info", help="print what a store holds")
    p.add_argument("store", help="a frame store or latent store folder")
    p = sub.add_parser("preview", help="write a stretch of a store as an mp4 and a gif to look at")
    p.add_argument("store", help="a frame store folder")
    p.add_argument("--start", type=int, default=0, help="first frame (default 0)")
    p.add_argument("--frames", type=positive(int), default=240, help="how many frames (default 240)")
    p.add_argument("--scale", type=positive(int), default=1, help="enlarge by this factor, nearest-neighbour")
    p.add_argument("--out", default="results/preview.mp4", help="mp4 path; the gif goes beside it")
    p = sub.add_parser("encode", help="encode a frame store with a trained ViT-VAE into a latent store for the DiT")
    p.add_argument("store", help="a frame store folder whose frames have the VAE's size (320x180)")
    p.add_argument("--vae", default="models/vae2", help="the ViT-VAE model folder (default models/vae2)")
    p.add_argument("--out", help="latent store folder (default: beside the store, <store>_latents)")
    p.add_argument("--batch_size", type=positive(int), default=64, help="frames per batch (default 64)")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    args = parser.parse_args()

    if args.command == "prepare":
        size = parse_size(args.size)
        if args.out is None and len(args.videos) > 1:
            raise UserError("give --out: the store that several videos go into")
        source = Path(args.videos[0])
        name = source.stem if source.is_file() else source.name
        out = args.out or source.parent / f"{name}_{args.fps:g}fps_{size[0]}x{size[1]}"
        print(describe(prepare(args.videos, out, args.fps, size, args.fit, args.crop)))
    elif args.command == "info":
        print(describe(open_store(args.store)))
    elif args.command == "preview":
        store = FrameStore(args.store)
        if not 0 <= args.start < store.count:
            raise UserError(f"--start must be in [0, {store.count})")
        frames = np.array(store.frames[args.start:args.start + args.frames])
        frames = frames.repeat(args.scale, axis=1).repeat(args.scale, axis=2)
        write_mp4(args.out, frames, store.fps)
        write_gif(Path(args.out).with_suffix(".gif"), frames, store.fps)
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.gif')} ({len(frames)} frames)")
    elif args.command == "encode":
        store = FrameStore(args.store)
        out = args.out or latents_folder(store.path)
        print(describe(encode(store, args.vae, out, get_device(args.device), args.batch_size)))


if __name__ == "__main__":
    run_cli(main)
