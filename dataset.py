"""Frame stores, and the windows of consecutive frames that training reads from them.

A frame store is a folder:
  frames.u8    uint8 frames (count, height, width, 3), RGB, raw row-major bytes read through a memory map
               (never loaded whole into RAM); its size must equal count * height * width * 3
  actions.npy  int64 (count,), only for game collectors: actions[i] is the action taken on seeing frame i, so the
               transition frame i -> frame i+1 is caused by actions[i]
  meta.json    source, fps, height, width, count, episode_starts (first frame of each episode, ascending, from 0),
               levels (one per episode, or null), num_actions and action_names (or null), and how it was made

Windows come out as (T, C, H, W) float tensors in [-1, 1]: for Celeste footage C, H, W = 3, 180, 320.

  python dataset.py prepare videos/z8r255LoVJc.mp4 --fps 12 --size 320x180     # -> videos/z8r255LoVJc_12fps_320x180/
  python dataset.py info videos/coinrun
  python dataset.py preview videos/coinrun --frames 300 --out results/coinrun.mp4
"""
import argparse
import json
import os
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from utils import UserError, atomic_dir, parse_size, positive, run_cli, write_gif, write_mp4

FRAMES, ACTIONS, META = "frames.u8", "actions.npy", "meta.json"


# ----------------------------------------------------------------------------- the store

class FrameStore:
    """A frame store opened for reading. Every file is checked against meta.json when it is opened."""

    def __init__(self, path):
        self.path = Path(path)
        if not (self.path / META).is_file():
            raise UserError(f"{self.path} is not a frame store (no {META})")
        try:
            self.meta = json.loads((self.path / META).read_text())
            self.count, self.height, self.width = (int(self.meta[k]) for k in ("count", "height", "width"))
            self.episode_starts = [int(s) for s in self.meta["episode_starts"]]
            self.levels = self.meta.get("levels")
            self.fps = float(self.meta["fps"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{self.path / META} is malformed: {type(e).__name__} {e}") from None
        check_meta(self.path, self.meta)
        expected = self.count * self.height * self.width * 3
        size = (self.path / FRAMES).stat().st_size if (self.path / FRAMES).is_file() else -1
        if size != expected:
            raise UserError(f"{self.path / FRAMES} holds {size} bytes but meta.json describes {self.count} frames of "
                            f"{self.height}x{self.width}x3 = {expected} bytes (truncated or foreign file?)")
        self.has_actions = (self.path / ACTIONS).exists()
        if self.has_actions:
            try:
                actions = np.load(self.path / ACTIONS, mmap_mode="r")
            except ValueError as e:
                raise UserError(f"{self.path / ACTIONS} is unreadable: {e}") from None
            if actions.shape != (self.count,):
                raise UserError(f"{self.path / ACTIONS} has shape {actions.shape}, meta.json says {self.count} frames")
        self._frames = self._actions = None

    # Memory maps are opened lazily, so that a store pickled into DataLoader workers sends only its path.
    @property
    def frames(self):  # (count, H, W, 3) uint8
        if self._frames is None:
            self._frames = np.memmap(self.path / FRAMES, np.uint8, "r", shape=(self.count, self.height, self.width, 3))
        return self._frames

    @property
    def actions(self):  # (count,) int64, or None
        if self._actions is None and self.has_actions:
            self._actions = np.load(self.path / ACTIONS, mmap_mode="r")
        return self._actions

    def __getstate__(self):
        return {**self.__dict__, "_frames": None, "_actions": None}

    def __len__(self):
        return self.count

    def episodes(self):
        """[(start, end), ...]: the frame range of each episode, end exclusive."""
        return list(zip(self.episode_starts, self.episode_starts[1:] + [self.count]))


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


# ----------------------------------------------------------------------------- video -> store

def prepare(video, out, fps=12.0, size=(320, 180)):
    """Decode `video` with OpenCV, resample it to `fps` by timestamp, resize to `size` (W, H) and write a store at `out`.

    Output frame k shows the source frame whose timestamp is nearest to k / fps, so any source rate works (29.97,
    variable, or lower than `fps`). Frames stream to disk one at a time: RAM does not grow with the video's length.
    """
    video = Path(video)
    if not video.is_file():
        raise UserError(f"video {video} does not exist")
    if video.stat().st_size == 0:
        raise UserError(f"video {video} is empty")
    capture = cv2.VideoCapture(str(video))
    source_fps = capture.get(cv2.CAP_PROP_FPS)
    if not capture.isOpened() or not source_fps > 0:
        raise UserError(f"{video} is not a video OpenCV can decode (missing header, truncated or another format)")
    width, height = size
    expected = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) / source_fps * fps)
    count, last_time, last_frame, index = 0, None, None, 0
    with atomic_dir(out) as tmp, open(tmp / FRAMES, "wb") as f, \
            tqdm(total=expected, unit="frame", desc=f"prepare {video.name}") as bar:
        def emit_until(time_limit):  # write last_frame for every output time before time_limit
            nonlocal count
            while count / fps < time_limit:
                f.write(last_frame)
                count += 1
                bar.update()
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            # Container timestamps where they are sane (variable-rate video), else the nominal rate.
            time = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000
            if last_time is not None and not time > last_time:
                time = last_time + 1 / source_fps
            elif last_time is None:
                time = 0.0
            if last_frame is not None:
                emit_until((last_time + time) / 2)
            if frame.shape[:2] != (height, width):
                frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
            last_frame, last_time, index = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB).tobytes(), time, index + 1
        if last_frame is None:
            raise UserError(f"no frame could be decoded from {video} (empty or truncated video)")
        emit_until(last_time + 1 / source_fps)
        f.flush()
        write_meta(tmp, source=str(video), fps=fps, height=height, width=width, count=count, episode_starts=[0],
                   source_fps=source_fps, source_frames=index)
    return FrameStore(out)


def open_frames(data, fps=12.0, size=(320, 180)):
    """A training script's DATA: a store folder, or a video prepared on first use into <video>_<fps>fps_<W>x<H>/."""
    data = Path(data)
    if data.is_dir():
        return FrameStore(data)
    cached = data.parent / f"{data.stem}_{fps:g}fps_{size[0]}x{size[1]}"
    if cached.is_dir():
        try:
            return FrameStore(cached)
        except UserError:  # an unusable cache is rebuilt rather than trusted
            pass
    return prepare(data, cached, fps, size)


# ----------------------------------------------------------------------------- windows

def held_out(key, fraction):
    """Deterministic pseudo-random choice of held-out episodes/levels (Knuth's multiplicative hash)."""
    return (int(key) * 2654435761 % 2**32) / 2**32 < fraction


def split_episodes(store, split, fraction=0.1):
    """Frame ranges of `split` ('train', 'val' or 'all'). Procgen stores split by level, so held-out levels are never
    seen in training; other stores by episode; a single long video by time (its last `fraction` is held out)."""
    episodes = store.episodes()
    if split == "all":
        return episodes
    if len(episodes) == 1:
        start, end = episodes[0]
        cut = start + round((end - start) * (1 - fraction))
        return [(start, cut)] if split == "train" else [(cut, end)]
    keys = store.levels if store.levels is not None else range(len(episodes))
    want_val = split == "val"
    return [ep for ep, key in zip(episodes, keys) if held_out(key, fraction) == want_val]


class WindowDataset(torch.utils.data.Dataset):
    """Windows of `seq_len` consecutive frames that never cross an episode boundary.

    Item: {"frames": (T, C, H, W) float in [-1, 1], "actions": (T,) int64 (only if the store has actions)}.
    actions[k] is the true action taken at frame k, so frames[k] -> frames[k + 1] is caused by actions[k].
    """

    def __init__(self, store, seq_len, split="train", held_out_fraction=0.1, stride=1):
        self.store = store if isinstance(store, FrameStore) else FrameStore(store)
        self.seq_len = seq_len
        ranges = split_episodes(self.store, split, held_out_fraction)
        starts = [np.arange(s, e - seq_len + 1, stride) for s, e in ranges if e - s >= seq_len]
        if not starts:
            raise UserError(f"the {split} split of {self.store.path} has no episode of {seq_len} frames or more")
        self.starts = np.concatenate(starts)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        s = int(self.starts[i])
        frames = torch.from_numpy(np.array(self.store.frames[s:s + self.seq_len]))  # (T, H, W, C) uint8
        item = {"frames": frames.permute(0, 3, 1, 2).float() / 127.5 - 1}  # (T, C, H, W)
        if self.store.has_actions:
            item["actions"] = torch.from_numpy(np.array(self.store.actions[s:s + self.seq_len], dtype=np.int64))
        return item


# ----------------------------------------------------------------------------- command line

def describe(store):
    """A few lines on what a store holds."""
    lengths = np.diff(store.episode_starts + [store.count])
    lines = [f"store       {store.path}",
             f"source      {store.meta['source']}",
             f"frames      {store.count} x (3, {store.height}, {store.width}) uint8 = "
             f"{store.count * store.height * store.width * 3 / 2**30:.2f} GiB",
             f"fps         {store.fps:g} ({store.count / store.fps / 3600:.2f} h)",
             f"episodes    {len(lengths)}, length min/mean/max {lengths.min()}/{lengths.mean():.1f}/{lengths.max()}"]
    if store.levels is not None:
        lines.append(f"levels      {len(set(store.levels))} distinct")
    if store.has_actions:
        actions = np.asarray(store.actions)
        names = store.meta.get("action_names") or [str(a) for a in range(store.meta["num_actions"])]
        held = len(actions) / (1 + np.count_nonzero(np.diff(actions)))
        counts = np.bincount(actions, minlength=len(names))
        lines.append(f"actions     {len(names)} kinds, held {held:.1f} steps on average")
        lines += [f"  {a:2d} {names[a]:<12s} {c / len(actions):6.1%}" for a, c in enumerate(counts) if c]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description="Frame stores: make one from a video, describe one, preview one.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="decode a video into a frame store (resampled by timestamp, resized)")
    p.add_argument("video", help="a video file OpenCV can read (mp4, webm, mkv, avi)")
    p.add_argument("--fps", type=positive(float), default=12.0, help="frames per second of the store (default 12)")
    p.add_argument("--size", default="320x180", help="WIDTHxHEIGHT of the stored frames (default 320x180)")
    p.add_argument("--out", help="store folder (default: beside the video, <name>_<fps>fps_<W>x<H>)")
    p = sub.add_parser("info", help="print what a store holds")
    p.add_argument("store", help="a frame store folder")
    p = sub.add_parser("preview", help="write a stretch of a store as an mp4 and a gif to look at")
    p.add_argument("store", help="a frame store folder")
    p.add_argument("--start", type=int, default=0, help="first frame (default 0)")
    p.add_argument("--frames", type=positive(int), default=240, help="how many frames (default 240)")
    p.add_argument("--scale", type=positive(int), default=1, help="enlarge by this factor, nearest-neighbour")
    p.add_argument("--out", default="results/preview.mp4", help="mp4 path; the gif goes beside it")
    args = parser.parse_args()

    if args.command == "prepare":
        size = parse_size(args.size)
        video = Path(args.video)
        out = args.out or video.parent / f"{video.stem}_{args.fps:g}fps_{size[0]}x{size[1]}"
        print(describe(prepare(video, out, args.fps, size)))
    elif args.command == "info":
        print(describe(FrameStore(args.store)))
    elif args.command == "preview":
        store = FrameStore(args.store)
        if not 0 <= args.start < store.count:
            raise UserError(f"--start must be in [0, {store.count})")
        frames = np.array(store.frames[args.start:args.start + args.frames])
        frames = frames.repeat(args.scale, axis=1).repeat(args.scale, axis=2)
        write_mp4(args.out, frames, store.fps)
        write_gif(Path(args.out).with_suffix(".gif"), frames, store.fps)
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.gif')} ({len(frames)} frames)")


if __name__ == "__main__":
    run_cli(main)
