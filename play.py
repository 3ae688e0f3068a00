"""Play a learned Genie world with its latent actions.

  python play.py --models models/genie                                                 # a page in the browser
  python play.py --models models/genie --actions "3,3,1,0,0,5" --use_dataset_frame   # batch: PNGs, gif and mp4
  python play.py --models models/genie --image frame.png --ui terminal                 # keys 0-7 step, r resets, q quits

On a GPU server with no screen, the page is reached through an SSH port forward, as with TensorBoard:
  server$ python play.py --models models/genie            # prints the URL and the ssh line
  laptop$ ssh -N -L 8765:127.0.0.1:8765 you@server        # then open http://localhost:8765/

Every front end talks to a `GenieWorld`: reset() -> frame, step(action) -> frame (uint8 (64, 64, 3)). The world's
dynamics.Sampler keeps the key/value cache, so a step runs the transformer only on the new frame's tokens.
"""
import argparse
import base64
import itertools
import json
import os
import secrets
import sys
import tempfile
import threading
import time
import webbrowser
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import cv2
import numpy as np
import torch

from dataset import FrameStore, split_episodes
from dynamics import Dynamics, Sampler
from utils import (UserError, add_step_compile_flag, autocast, compile_step, from_uint8, get_device, load_model,
                   run_cli, seed_everything, to_uint8, write_gif, write_mp4)
from vae import Tokenizer


class GenieWorld:
    """A batch of worlds stepped together (batch 1 for play). Frames are uint8 (B, H, W, 3).

    The interface every front end uses: reset(frames) -> frames, step(actions) -> frames, undo() -> frames,
    num_actions, and `meaning` (read_meaning: what each latent action does, or None). Any world model that offers these
    plugs into the terminal and web front ends. Runs in bf16 on CUDA."""

    def __init__(self, tokenizer, dynamics, maskgit_steps=8, temperature=0.0, seed=0, meaning=None, sampler=None):
        self.tokenizer, self.dynamics, self.meaning = tokenizer, dynamics, meaning
        self.device = next(dynamics.parameters()).device
        self.num_actions = dynamics.config.num_actions
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.sampler = sampler or Sampler(dynamics, maskgit_steps, temperature)
        self.tokens, self.actions = [], []  # the trajectory so far, for undo

    @classmethod
    def load(cls, models, device=None, **options):
        device = get_device(device)
        return cls(load_model(Tokenizer, Path(models) / "tokenizer", device),
                   load_model(Dynamics, Path(models) / "dynamics", device), meaning=read_meaning(models), **options)

    def compile(self):
        """Compile what runs for every step (utils.compile_step), for this world and those it spawns: the dynamics'
        cached MaskGIT step, which also serves the frame's commit to the cache, and the tokenizer's decode."""
        self.dynamics.hidden = compile_step(self.dynamics.hidden, self.device)
        self.tokenizer.decode = compile_step(self.tokenizer.decode, self.device)

    def spawn(self, seed):
        """Another world on the same models (one per browser session), sharing this one's sampler: one KV cache for
        all of them, so a compiled step sees the same tensors whichever world steps. The sampler holds one world's
        context at a time (`sampler.holder`); a world that finds another's there starts it again from its own frames."""
        return GenieWorld(self.tokenizer, self.dynamics, seed=seed, meaning=self.meaning, sampler=self.sampler)

    def start_sampler(self):
        """The sampler continues from this world's last context - 1 frames and the actions between them."""
        frames = self.tokens[-(self.dynamics.config.context - 1):]
        actions = self.actions[len(self.actions) - (len(frames) - 1):]
        actions = torch.stack(actions, 1) if actions else frames[0].new_zeros(len(frames[0]), 0)
        self.sampler.start(torch.stack(frames, 1), actions)
        self.sampler.holder = self

    @torch.no_grad()
    def reset(self, frames):
        """Start from prompt frames uint8 (B, H, W, 3); returns them as the model sees them (tokenised)."""
        x = from_uint8(torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2))
        with autocast(self.device):
            self.tokens, self.actions = [self.tokenizer.encode(x)], []  # [(B, rows, cols)]
            self.start_sampler()
            return to_uint8(self.tokenizer.decode(self.tokens[0]))

    @torch.no_grad()
    def step(self, actions):
        """Advance every world by one latent action, actions (B,) ints; returns the new frames."""
        actions = torch.as_tensor(actions, device=self.device).long().view(-1)
        with autocast(self.device):
            if self.sampler.holder is not self:
                self.start_sampler()
            tokens = self.sampler.step(actions, self.generator)
            self.tokens.append(tokens)
            self.actions.append(actions)
            return to_uint8(self.tokenizer.decode(tokens))

    @torch.no_grad()
    def undo(self):
        """Go back one step (never past the prompt); the sampler starts again from the last context frames."""
        if len(self.tokens) > 1:
            self.tokens.pop()
            self.actions.pop()
        with autocast(self.device):
            self.start_sampler()
            return to_uint8(self.tokenizer.decode(self.tokens[-1]))


# What each key of the page asks for, in order of preference: an effect name of evaluate.action_effect, or a word of one.
KEY_EFFECTS = {"ArrowLeft": ["left"], "ArrowRight": ["right"], "ArrowUp": ["jump", "up"], " ": ["jump", "fire"],
               "ArrowDown": ["down", "none"]}


def read_meaning(models):
    """What each latent action most often did on held-out data, as evaluate.py genie wrote it to MODELS/meaning.json:
    [{"action", "effect", "share", "count"}, ...]; None when the models have not been evaluated."""
    path = Path(models) / "meaning.json"
    if not path.exists():
        return None
    try:
        return [dict(action=int(m["action"]), effect=str(m["effect"]), share=float(m["share"]))
                for m in json.loads(path.read_text())["meaning"]]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not the meaning table evaluate.py genie writes; delete it or rerun "
                        f"evaluate.py genie") from None


def action_labels(meaning, num_actions):
    """A label per latent action: '3: right + jump (71 %)' with a meaning, '3' without."""
    effects = {m["action"]: f"{m['effect']} ({m['share']:.0%})" for m in meaning or []}
    return [f"{a}: {effects[a]}" if a in effects else str(a) for a in range(num_actions)]


def default_keymap(meaning):
    """The arrow keys and space -> the latent action that means what the key asks for (KEY_EFFECTS): of those whose
    effect is exactly that, else of those whose effect includes it, the one with the largest share; -1 for none."""
    keymap = {}
    for key, wanted in KEY_EFFECTS.items():
        keymap[key] = -1
        for matches in (lambda m, w: m["effect"] == w, lambda m, w: w in m["effect"].split(" + ")):
            found = [m for w in wanted for m in meaning or [] if matches(m, w)]
            if found:
                keymap[key] = max(found, key=lambda m: m["share"])["action"]
                break
    return keymap


def prompt_frame(args, rng):
    """The first frame: --image, or a random frame of --data's held-out levels (--use_dataset_frame)."""
    if args.image:
        image = cv2.imread(str(args.image), cv2.IMREAD_COLOR)
        if image is None:
            raise UserError(f"--image {args.image} is not an image file that OpenCV can read")
        return cv2.resize(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), (64, 64), interpolation=cv2.INTER_AREA)
    store = FrameStore(args.data)
    ranges = split_episodes(store, "val") or store.episodes()
    start, end = ranges[rng.integers(len(ranges))]
    return np.array(store.frames[rng.integers(start, end)])


def parse_actions(text, num_actions):
    try:
        actions = [int(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise UserError(f"--actions must be comma-separated integers in [0, {num_actions}), not {text!r}") from None
    bad = [a for a in actions if not 0 <= a < num_actions]
    if bad or not actions:
        raise UserError(f"--actions must be comma-separated integers in [0, {num_actions}); got {bad or text!r}")
    return actions


def save_frame(path, frame, scale=4):
    """Write a frame as PNG, enlarged with nearest-neighbour so the pixels stay crisp."""
    frame = frame.repeat(scale, axis=0).repeat(scale, axis=1)
    cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))


def play_batch(world, first, actions, out):
    frames = [world.reset(first[None])[0]]
    for action in actions:
        frames.append(world.step([action])[0])
    for i, frame in enumerate(frames):
        save_frame(out / f"frame_{i:04d}.png", frame)
    video = np.stack(frames).repeat(4, axis=1).repeat(4, axis=2)
    write_gif(out / "rollout.gif", video, fps=8)
    write_mp4(out / "rollout.mp4", video, fps=8)
    print(f"wrote {len(frames)} frames (prompt + {len(actions)} steps) to {out}: frame_*.png, rollout.gif, rollout.mp4")


def play_terminal(world, new_prompt, out):
    """Keys 0..N-1 step the world, r resets to a new prompt frame, q quits; the frame is written after every step.
    Reads single keys from a terminal, or characters from piped input."""
    keys = sys.stdin
    if sys.stdin.isatty():
        import termios
        import tty
        saved = termios.tcgetattr(sys.stdin)
        tty.setcbreak(sys.stdin)
    print(f"keys: 0-{world.num_actions - 1} act ({', '.join(action_labels(world.meaning, world.num_actions))}), "
          f"r reset, q quit; current frame: {out / 'current.png'}")
    try:
        frame, step = world.reset(new_prompt()[None])[0], 0
        save_frame(out / "current.png", frame)
        while True:
            key = keys.read(1)
            if key in ("", "q"):
                break
            if key == "r":
                frame, step = world.reset(new_prompt()[None])[0], 0
            elif key.isdigit() and int(key) < world.num_actions:
                frame, step = world.step([int(key)])[0], step + 1
                save_frame(out / f"step_{step:04d}.png", frame)
            else:
                continue
            save_frame(out / "current.png", frame)
            print(f"step {step}: {'reset' if key == 'r' else f'action {key}'}", flush=True)
    finally:
        if sys.stdin.isatty():
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)

class WebSession:
    """One browser tab: its own world and the frames shown so far (for undo and the download)."""

    def __init__(self, world, first_frame):
        self.world, self.frames = world, [world.reset(first_frame[None])[0]]


def warm_up(world):
    """One reset, step and undo of a throwaway world on the same models."""
    size = world.tokenizer.config.image_size
    scratch = world.spawn(0)
    scratch.reset(np.zeros((1, size, size, 3), np.uint8))
    scratch.step([0])
    scratch.undo()


def png_data_url(frame):
    return "data:image/png;base64," + base64.b64encode(cv2.imencode(".png", frame[..., ::-1])[1]).decode()


def serve_web(world, new_prompt, host, port, open_browser, max_sessions=16):
    """Serve play.html and a small JSON API; every action is one POST answered with the new frame.

    Why plain HTTP requests: the world advances only when an action arrives, so request/response is the natural shape,
    a 64x64 PNG is ~4 kB, and it needs nothing but the standard library on the server and fetch() in the page; it goes
    through an SSH port forward unchanged. Requests from another Origin (or for another Host, DNS rebinding) get 403.
    """
    page = Path(__file__).with_name("play.html").read_bytes()
    labels = action_labels(world.meaning, world.num_actions)
    keymap = default_keymap(world.meaning) if world.meaning else None  # without a meaning the page keeps its own
    sessions, lock, seeds = OrderedDict(), threading.Lock(), itertools.count(1)
    # Every model call runs on this one thread, one at a time: sessions never see each other's state half-updated,
    # and the CUDA graphs of --compile, which torch records per thread, are recorded once, not once per request.
    model_thread = ThreadPoolExecutor(max_workers=1)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # one line per step would drown the URL the user needs
            pass

        def reply(self, code, body, content_type="application/json", headers=()):
            if isinstance(body, dict):
                body = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for key, value in headers:
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def own_origin(self):
            port_now = self.server.server_address[1]
            names = {"127.0.0.1", "localhost", "[::1]", host}
            hosts = {f"{name}:{port_now}" for name in names}
            origin = self.headers.get("Origin")
            return self.headers.get("Host") in hosts and (origin is None or origin in {f"http://{h}" for h in hosts})

        def session(self, session_id):
            if session_id not in sessions:
                raise KeyError("unknown or expired session: reload the page")
            sessions.move_to_end(session_id)
            return sessions[session_id]

        def do_GET(self):
            if not self.own_origin():
                return self.reply(403, {"error": "request from a foreign origin refused"})
            url = urlparse(self.path)
            if url.path == "/":
                return self.reply(200, page, "text/html; charset=utf-8")
            if url.path != "/api/download":
                return self.reply(404, {"error": f"no such page: {url.path}"})
            query = parse_qs(url.query)
            fmt = query.get("format", [""])[0]
            if fmt not in ("gif", "mp4"):
                return self.reply(400, {"error": "format must be gif or mp4"})
            with lock:
                try:
                    frames = np.stack(self.session(query.get("session", [""])[0]).frames)
                except KeyError as e:
                    return self.reply(404, {"error": e.args[0]})
            frames = frames.repeat(4, axis=1).repeat(4, axis=2)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"session.{fmt}"
                (write_gif if fmt == "gif" else write_mp4)(path, frames, 8)
                body = path.read_bytes()
            self.reply(200, body, "image/gif" if fmt == "gif" else "video/mp4",
                       [("Content-Disposition", f'attachment; filename="gameworld_session.{fmt}"')])

        def do_POST(self):
            if not self.own_origin():
                return self.reply(403, {"error": "request from a foreign origin refused"})
            try:
                length = int(self.headers.get("Content-Length") or 0)
                request = json.loads(self.rfile.read(length) or b"{}") if length < 65536 else None
                if not isinstance(request, dict):
                    raise ValueError
            except ValueError:
                return self.reply(400, {"error": "the body must be a JSON object"})
            code, answer = model_thread.submit(self.act, request).result()
            self.reply(code, answer)

        def act(self, request):
            """The POST's work, on the model thread -> (HTTP status, JSON reply)."""
            with lock:
                try:
                    started = time.perf_counter()
                    if self.path == "/api/session":
                        session_id = secrets.token_urlsafe(12)
                        sessions[session_id] = WebSession(world.spawn(next(seeds)), new_prompt())
                        while len(sessions) > max_sessions:
                            sessions.popitem(last=False)
                        session = sessions[session_id]
                    elif self.path in ("/api/step", "/api/reset", "/api/undo"):
                        session_id = request.get("session")
                        session = self.session(session_id)
                        if self.path == "/api/step":
                            action = request.get("action")
                            if not isinstance(action, int) or isinstance(action, bool) or \
                                    not 0 <= action < world.num_actions:
                                return 400, {"error": f"unknown action {action!r}: "
                                                      f"use an integer in [0, {world.num_actions})"}
                            session.frames.append(session.world.step([action])[0])
                        elif self.path == "/api/reset":
                            session.frames = [session.world.reset(new_prompt()[None])[0]]
                        else:
                            session.frames = session.frames[:-1] or session.frames
                            session.world.undo()
                    else:
                        return 404, {"error": f"no such endpoint: {self.path}"}
                except KeyError as e:
                    return 404, {"error": e.args[0]}
                return 200, {"session": session_id, "frame": png_data_url(session.frames[-1]),
                             "step": len(session.frames) - 1, "num_actions": world.num_actions,
                             "labels": labels, "keymap": keymap, "ms": (time.perf_counter() - started) * 1000}

    # The first calls compile (--compile) and warm up the kernels: make them now, on the model thread (where CUDA graphs
    # must be recorded), rather than at the player's first key.
    model_thread.submit(warm_up, world).result()
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; pass another --port") from None
    port = server.server_address[1]
    url = f"http://{'localhost' if host in ('127.0.0.1', '::1') else host}:{port}/"
    print(f"play page: {url}")
    print(f"from a laptop: ssh -N -L {port}:127.0.0.1:{port} USER@THIS_SERVER  then open http://localhost:{port}/",
          flush=True)
    if open_browser and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or sys.platform == "darwin"):
        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
        model_thread.shutdown()


def main():
    parser = argparse.ArgumentParser(description="Play a trained Genie world with latent actions.")
    parser.add_argument("--models", default="models/genie", help="folder with tokenizer/ and dynamics/ (train_genie.py)")
    parser.add_argument("--actions", help="batch mode: comma-separated latent actions, e.g. '3,3,1,0'")
    parser.add_argument("--image", help="prompt frame (PNG/JPEG, resized to 64x64)")
    parser.add_argument("--use_dataset_frame", action="store_true",
                        help="prompt with a random frame of --data's held-out levels (the default without --image)")
    parser.add_argument("--data", default="videos/coinrun", help="frame store for --use_dataset_frame")
    parser.add_argument("--output_dir", default="outputs", help="where frames, gif and mp4 are written")
    parser.add_argument("--ui", default="web", choices=["web", "terminal"],
                        help="interactive front end: a page in the browser (default) or keys in this terminal")
    parser.add_argument("--host", default="127.0.0.1", help="web: address to listen on (default 127.0.0.1 only)")
    parser.add_argument("--port", type=int, default=8765, help="web: port (default 8765; 0 picks a free one)")
    parser.add_argument("--no_browser", action="store_true", help="web: do not open a browser even with a display")
    parser.add_argument("--maskgit_steps", type=int, default=8, help="parallel decoding steps per frame (default 8)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature of the next frame's tokens (default 0: the most likely ones)")
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt choice and the sampling")
    add_step_compile_flag(parser)
    args = parser.parse_args()
    if args.maskgit_steps < 1:
        raise UserError("--maskgit_steps must be at least 1")
    seed_everything(args.seed)
    world = GenieWorld.load(args.models, args.device, maskgit_steps=args.maskgit_steps,
                            temperature=args.temperature, seed=args.seed)
    if args.compile:
        world.compile()
        print("--compile: the first step compiles, which takes a minute or two", file=sys.stderr, flush=True)
    actions = parse_actions(args.actions, world.num_actions) if args.actions is not None else None
    rng = np.random.default_rng(args.seed)
    first = prompt_frame(args, rng)
    out = Path(args.output_dir)
    if actions is not None or args.ui == "terminal":
        out.mkdir(parents=True, exist_ok=True)
    if actions is not None:
        play_batch(world, first, actions, out)
    else:
        unused = [first]

        def new_prompt():
            return unused.pop() if unused else prompt_frame(args, rng)
        if args.ui == "web":
            serve_web(world, new_prompt, args.host, args.port, not args.no_browser)
        else:
            play_terminal(world, new_prompt, out)


if __name__ == "__main__":
    run_cli(main)
