"""Get training data: gameplay videos through yt-dlp, or game frames with their true actions from procgen or ALE.

  python download.py https://www.youtube.com/watch?v=z8r255LoVJc             # -> videos/z8r255LoVJc.mp4 (Celeste)
  python download.py "https://www.youtube.com/playlist?list=PL..."          # -> videos/PL.../001_<id>.mp4, ...
  python download.py clip.mp4 file:///abs/path/other.mp4                     # local files take the same yt-dlp path
  python download.py procgen:coinrun --frames 1000000 --out videos/coinrun   # 64x64 frames + actions + levels
  python download.py ale:breakout --frames 100000 --out videos/breakout      # 210x160 Atari frames + actions

Videos: the smallest stream with at least twice the rows of the training size (--size, default 320x180: 360 rows)
is downloaded, or the largest up to --max_height. A playlist or channel goes into one folder, which `dataset.py
prepare` turns into one store. A rerun skips complete files and resumes partial ones (yt-dlp's .part files).
Games: the store (see dataset.py) gets the true action of every step, the episode starts and, for procgen, the level
of each episode. The models never see the actions; evaluate.py uses them to check what the latent actions learned.
The behaviour policy holds each action for a random 1..--max_hold steps and favours the moves that matter (see
action_weights), so clips show sustained movement rather than per-step jitter.
"""
import argparse
import math
import re
import sys
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import cv2
import numpy as np
from tqdm import tqdm

from dataset import ACTIONS, VIDEO_SUFFIXES, FrameStore, FrameWriter, describe, probe, write_meta
from utils import UserError, atomic_dir, first_line, parse_size, positive, run_cli


# ----------------------------------------------------------------------------- behaviour policy

class HeldActionPolicy:
    """Each env draws an action from `weights` and holds it for a uniform 1..max_hold steps, then draws again."""

    def __init__(self, num_envs, weights, max_hold, rng):
        self.p = np.asarray(weights, np.float64) / np.sum(weights)
        self.max_hold, self.rng = max_hold, rng
        self.action = np.zeros(num_envs, np.int64)
        self.steps_left = np.zeros(num_envs, np.int64)

    def __call__(self):
        expired = self.steps_left <= 0
        n = int(expired.sum())
        if n:
            self.action[expired] = self.rng.choice(len(self.p), n, p=self.p)
            self.steps_left[expired] = self.rng.integers(1, self.max_hold + 1, n)
        self.steps_left -= 1
        return self.action.copy()


def action_weights(names):
    """Arrow moves are what move the player in every procgen and most Atari games: weight 1. Standing still: 0.5.
    Letter keys (procgen's D A W S Q E: fire or special in a few games only) and Atari's FIRE-only: 0.15."""
    def weight(name):
        moves = {"LEFT", "RIGHT", "UP", "DOWN"}
        parts = set(re.findall(r"LEFT|RIGHT|UP|DOWN", name))
        if name == "NOOP":
            return 0.5
        return 1.0 if parts & moves else 0.15
    return [weight(n) for n in names]


# ----------------------------------------------------------------------------- collectors

def collect_procgen(game, out, frames, num_envs, start_level, num_levels, distribution_mode, seed, size, max_hold,
                    frame_skip=1):
    """procgen frames (64x64 observations, or the 512x512 render resized to `size`), actions, episodes, levels.

    Env j fills frames [j * steps, (j + 1) * steps): each env's trajectory stays contiguous, and its block starts
    a new episode. actions[i] is the action taken on seeing frame i (procgen: observe, then act), for frame_skip
    game steps: frame i + 1 is what the game shows after them (an episode that ended among them starts at it).
    """
    from procgen import ProcgenGym3Env
    from procgen.env import ENV_NAMES
    if game not in ENV_NAMES:  # procgen aborts the whole process on an unknown name: check first
        raise UserError(f"unknown procgen game {game!r}; choose from {', '.join(ENV_NAMES)}")
    render = size not in (None, (64, 64))
    width, height = size or (64, 64)
    env = ProcgenGym3Env(num=num_envs, env_name=game, start_level=start_level, num_levels=num_levels,
                         distribution_mode=distribution_mode, rand_seed=seed, num_threads=min(num_envs, 8),
                         render_mode="rgb_array" if render else None)
    names = ["+".join(combo) or "NOOP" for combo in env.combos]
    policy = HeldActionPolicy(num_envs, action_weights(names), max_hold, np.random.default_rng(seed))
    steps = math.ceil(frames / num_envs)
    position = np.arange(num_envs) * steps  # where env j writes its frame of step 0
    levels = {}  # first frame of an episode -> its level
    started = np.zeros(num_envs, bool)  # an episode began during the skipped steps
    with atomic_dir(out) as tmp:
        store = FrameWriter(tmp, frames, height, width)
        actions = np.zeros(frames, np.int64)
        for step in tqdm(range(steps), unit="step", unit_scale=num_envs, desc=f"collect procgen:{game}"):
            _, obs, first = env.observe()
            first = first | started
            keep = position + step < frames
            if render:
                rgb = np.stack([cv2.resize(i["rgb"], (width, height), interpolation=cv2.INTER_AREA)
                                for i in env.get_info()])
            else:
                rgb = obs["rgb"]
            starts = (first | (step == 0)) & keep
            if starts.any():
                info = env.get_info()
                for j in np.flatnonzero(starts):
                    levels[int(position[j] + step)] = int(info[j]["level_seed"])
            action = policy()
            store.write(position[keep] + step, rgb[keep])
            actions[position[keep] + step] = action[keep]
            env.act(action.astype(np.int32))
            started[:] = False
            for _ in range(frame_skip - 1):
                started |= env.observe()[2]
                env.act(action.astype(np.int32))
        store.close()
        np.save(tmp / ACTIONS, actions)
        episode_starts = sorted(levels)
        write_meta(tmp, source=f"procgen:{game}", fps=15.0 / frame_skip, height=height, width=width, count=frames,
                   episode_starts=episode_starts, levels=[levels[s] for s in episode_starts],
                   num_actions=len(names), action_names=names,
                   collector=dict(num_envs=num_envs, start_level=start_level, num_levels=num_levels,
                                  distribution_mode=distribution_mode, seed=seed, max_hold=max_hold,
                                  frame_skip=frame_skip))


def collect_ale(game, out, frames, num_envs, seed, size, max_hold):
    """Atari frames from ale-py's vector env (its ROMs ship in the wheel), minimal action set, no sticky actions so
    that the recorded action is the one the game executed, frameskip 4 with max-pooling of the last two frames."""
    import ale_py
    from ale_py.vector_env import AtariVectorEnv
    if game not in ale_py.roms.get_all_rom_ids():
        raise UserError(f"unknown ALE game {game!r}; choose from {', '.join(ale_py.roms.get_all_rom_ids())}")
    ale = ale_py.ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.loadROM(ale_py.roms.get_rom_path(game))
    names = [a.name for a in ale.getMinimalActionSet()]
    width, height = size or (160, 210)
    env = AtariVectorEnv(game, num_envs, grayscale=False, stack_num=1, img_height=height, img_width=width,
                         repeat_action_probability=0.0, num_threads=min(num_envs, 8))
    policy = HeldActionPolicy(num_envs, action_weights(names), max_hold, np.random.default_rng(seed))
    steps = math.ceil(frames / num_envs)
    position = np.arange(num_envs) * steps
    episode_starts = set()
    obs, _ = env.reset(seed=seed)
    # Autoreset on the next step: the frame returned with done=True is the episode's last; the one after starts anew.
    done_before = np.ones(num_envs, bool)
    with atomic_dir(out) as tmp:
        store = FrameWriter(tmp, frames, height, width)
        actions = np.zeros(frames, np.int64)
        for step in tqdm(range(steps), unit="step", unit_scale=num_envs, desc=f"collect ale:{game}"):
            keep = position + step < frames
            episode_starts.update((position[done_before & keep] + step).tolist())
            action = policy()
            store.write(position[keep] + step, obs[keep, 0])
            actions[position[keep] + step] = action[keep]
            obs, _, terminated, truncated, _ = env.step(action)
            done_before = terminated | truncated
        env.close()
        store.close()
        np.save(tmp / ACTIONS, actions)
        write_meta(tmp, source=f"ale:{game}", fps=15.0, height=height, width=width, count=frames,
                   episode_starts=sorted(episode_starts), num_actions=len(names), action_names=names,
                   collector=dict(num_envs=num_envs, seed=seed, max_hold=max_hold, frameskip=4))


# ----------------------------------------------------------------------------- videos

class _YtdlpLog:
    """yt-dlp's messages, its ERROR lines kept aside: run_cli reports a failure once, in one line."""

    def __init__(self):
        self.errors = []

    def debug(self, msg):
        if not msg.startswith("[debug]"):
            print(msg)

    info = debug

    def warning(self, msg):
        print(msg, file=sys.stderr)

    def error(self, msg):
        self.errors.append(first_line(re.sub(r"\x1b\[[0-9;]*m|^ERROR: ", "", msg)))


def video_format(min_height, max_height=None):
    """yt-dlp's format selection and sorting: the smallest video stream at least `min_height` rows (area downsampling
    to the training size wants about twice its rows), else the largest there is; with `max_height`, the largest
    up to it. Video only where the site offers it (the footage is all we train on)."""
    if max_height:
        return f"bv*[height<=?{max_height}]/b[height<=?{max_height}]/bv*/b", [f"res:{max_height}"]
    # res:N prefers the largest up to N, else the smallest above: among streams of min_height or more, the smallest.
    return f"bv*[height>=?{min_height}]/b[height>=?{min_height}]/bv*/b", [f"res:{min_height}"]


def download_videos(source, out, min_height=360, max_height=None):
    """Download one URL, playlist or channel (or a local file, through yt-dlp's file:// support) into `out`:
    a video to out/<id>.<ext>, a playlist's videos to out/<playlist id>/<index>_<id>.<ext> (one folder, ready for
    `dataset.py prepare`). A rerun skips complete files and resumes partial ones. Returns the paths."""
    import imageio_ffmpeg
    import yt_dlp
    if "://" not in source:
        source = Path(source).resolve().as_uri()
    if source.startswith("file://"):
        path = Path(url2pathname(urlparse(source).path))
        if not path.is_file():
            raise UserError(f"{path} does not exist")
        if path.suffix.lower() in VIDEO_SUFFIXES:  # else a playlist (xspf, html, rss) for yt-dlp to read
            probe(path)
    bar = tqdm(unit="B", unit_scale=True, desc="download")

    def progress(d):
        bar.total = d.get("total_bytes") or d.get("total_bytes_estimate") or bar.total
        bar.n = d.get("downloaded_bytes") or bar.n
        bar.refresh()

    video_format_spec, format_sort = video_format(min_height, max_height)
    log = _YtdlpLog()
    options = {
        "outtmpl": str(Path(out) / "%(id)s.%(ext)s"),
        "format": video_format_spec,
        "format_sort": format_sort,
        "merge_output_format": "mp4",
        "ffmpeg_location": imageio_ffmpeg.get_ffmpeg_exe(),
        "enable_file_urls": True,
        "continuedl": True,  # resume a partial .part file
        "ignoreerrors": "only_download",  # one bad video of a playlist does not stop the others
        "noprogress": True,
        "progress_hooks": [progress],
        "logger": log,
        "retries": 3,
    }
    try:
        with yt_dlp.YoutubeDL(options) as ydl:
            info = ydl.extract_info(source, download=False, process=False)
            if info is not None and info.get("_type") in ("playlist", "multi_video"):
                folder = Path(out) / yt_dlp.utils.sanitize_filename(str(info.get("id") or "playlist"))
                ydl.params["outtmpl"]["default"] = str(folder / "%(playlist_index)03d_%(id)s.%(ext)s")
            info = ydl.process_ie_result(info, download=True) if info is not None else None
    except yt_dlp.utils.YoutubeDLError as e:
        message = first_line(re.sub(r"\x1b\[[0-9;]*m|^ERROR: ", "", str(e)))
        raise UserError(f"could not download {source}: {message}") from None
    finally:
        bar.close()
    paths = downloaded(info)
    for path in paths:
        try:
            probe(path)
        except UserError:
            path.unlink()
            raise
    if log.errors or not paths:
        done = f" ({len(paths)} other videos saved; rerun to retry)" if paths else ""
        raise UserError(f"could not download {source}: {log.errors[0] if log.errors else 'no video found'}{done}")
    return paths


def downloaded(info):
    """The files yt-dlp wrote for a video, or for every video of a playlist (a channel's are nested)."""
    if info is None:
        return []
    if "entries" in info:
        return [path for entry in info["entries"] or [] for path in downloaded(entry)]
    return [Path(d["filepath"]) for d in info.get("requested_downloads", [])]


# ----------------------------------------------------------------------------- command line

def main():
    parser = argparse.ArgumentParser(
        description="Download gameplay videos (yt-dlp) or collect game frames with their true actions.",
        epilog="Examples: `download.py https://www.youtube.com/watch?v=z8r255LoVJc`, "
               "`download.py procgen:coinrun --frames 1000000`, `download.py ale:breakout --frames 100000`")
    parser.add_argument("sources", nargs="+", metavar="URL_OR_FILE",
                        help="video URLs or files, or one game: procgen:<game> (coinrun, ...) or ale:<game> (breakout, ...)")
    parser.add_argument("--out", help="videos: folder for <id>.mp4 (default videos/); games: store folder "
                                      "(default videos/<game>)")
    parser.add_argument("--frames", type=positive(int), default=100_000, help="games: frames to collect")
    parser.add_argument("--num_envs", type=positive(int), default=64, help="games: environments run in parallel")
    parser.add_argument("--start_level", type=int, default=0, help="procgen: first level seed")
    parser.add_argument("--num_levels", type=int, default=0, help="procgen: number of levels, 0 for unlimited")
    parser.add_argument("--distribution_mode", default="hard", choices=["easy", "hard", "extreme", "memory", "exploration"],
                        help="procgen: level difficulty (default hard)")
    parser.add_argument("--size", help="games: WIDTHxHEIGHT of stored frames (default native: procgen 64x64, "
                                       "Atari 160x210; procgen renders other sizes from 512x512, ~100x slower). "
                                       "videos: the size you will train at (default 320x180): the smallest stream "
                                       "of at least twice its rows is downloaded")
    parser.add_argument("--max_height", type=positive(int),
                        help="videos: download the largest stream up to this many rows instead")
    parser.add_argument("--max_hold", type=positive(int), default=12, help="games: longest an action is held")
    parser.add_argument("--frame_skip", type=positive(int), default=1,
                        help="procgen: game steps each recorded action is repeated for; a frame is kept after each "
                             "repeat, so one transition shows frame_skip steps of motion (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="games: seed of the environments and the policy")
    parser.add_argument("--overwrite", action="store_true", help="games: replace an existing store at --out")
    args = parser.parse_args()

    games = [s for s in args.sources if re.match(r"^(procgen|ale):", s)]
    if games:
        if len(args.sources) != 1:
            raise UserError("give one game per command (procgen:<game> or ale:<game>), without video URLs")
        kind, game = games[0].split(":", 1)
        out = Path(args.out or f"videos/{game}")
        if out.exists() and not args.overwrite:
            raise UserError(f"{out} already exists; pass --overwrite to replace it or --out for another folder")
        size = parse_size(args.size) if args.size else None
        if kind == "procgen":
            collect_procgen(game, out, args.frames, args.num_envs, args.start_level, args.num_levels,
                            args.distribution_mode, args.seed, size, args.max_hold, args.frame_skip)
        elif args.frame_skip != 1:
            raise UserError("--frame_skip is for procgen; the ALE collector repeats each action 4 times already")
        else:
            collect_ale(game, out, args.frames, args.num_envs, args.seed, size, args.max_hold)
        print(describe(FrameStore(out)))
    else:
        min_height = 2 * parse_size(args.size or "320x180")[1]
        for source in args.sources:
            paths = download_videos(source, args.out or "videos", min_height, args.max_height)
            where = paths[0] if len(paths) == 1 else f"{len(paths)} videos in {paths[0].parent}/"
            print(f"saved {where}")


if __name__ == "__main__":
    run_cli(main)
