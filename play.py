"""Play a learned world with its latent actions: a Genie world (train_genie.py) or a diffusion world (train_dit.py --lam).

  python play.py --models models/genie                                                 # a page in the browser
  python play.py --models models/genie --actions "3,3,1,0,0,5" --use_dataset_frame   # batch: PNGs, gif and mp4
  python play.py --models models/genie --image frame.png --ui terminal                 # keys 0-7 step, r resets, q quits
  python play.py --models models                                     # the diffusion world of models/{vae2,lam,dit}

On a GPU server with no screen, the page is reached through an SSH port forward, as with TensorBoard:
  server$ python play.py --models models/genie            # prints the URL and the ssh line
  laptop$ ssh -N -L 8765:127.0.0.1:8765 you@server        # then open http://localhost:8765/

Every front end talks to a world: reset() -> frame, step(action) -> frame (uint8 (H, W, 3): 64x64 for Genie, the
VAE's 320x180 for diffusion). Each world's sampler (dynamics.Sampler, dit.Sampler) keeps the key/value cache, so a step
runs the transformer only on the new frame's tokens.
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

import dit
from dataset import action_effect, open_frames, require_size, split_episodes
from dynamics import CFG_SCALE as GENIE_CFG_SCALE, Dynamics, Sampler
from generate import CFG_SCALE, compile_world, decode_frame, load_world, model_folder
from utils import (UserError, add_step_compile_flag, autocast, compile_step, from_uint8, get_device, load_model,
                   parse_actions, positive, run_cli, seed_everything, to_uint8, write_gif, write_mp4)
from vae import Tokenizer

# Euler steps per frame of the diffusion world: more are slower and, at the demo scale, no better (README's table)
EULER_STEPS = 1


class World:
    """A batch of worlds stepped together (batch 1 for play). Frames are uint8 (B, H, W, 3).

    The interface every front end uses: reset(frames) -> frames, step(actions) -> frames, undo() -> frames,
    spawn(seed) -> a world on the same models, num_actions, frame_size (H, W), and `meaning` (read_meaning: what each
    latent action does, or None). A world model plugs into the batch, terminal and web front ends by setting
    self.device and giving encode, decode, advance and start_sampler. Runs in bf16 on CUDA.

    A world keeps its trajectory for undo: `latents`, the model's form of each frame, and `actions`, those taken
    between them. Worlds spawned from one share its sampler (one browser session each): one key/value cache for all,
    so a compiled step sees the same tensors whichever world steps. The sampler holds one world's context at a time
    (`sampler.holder`); a world that finds another's there starts it again from its own frames."""

    def __init__(self, num_actions, frame_size, sampler, seed, meaning):
        self.num_actions, self.frame_size, self.sampler, self.meaning = num_actions, frame_size, sampler, meaning
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.latents, self.actions = [], []

    @torch.no_grad()
    def reset(self, frames):
        """Start from prompt frames uint8 (B, H, W, 3); returns them as the model sees them (encoded and decoded)."""
        x = from_uint8(torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2))
        with autocast(self.device):
            self.latents, self.actions = [self.encode(x)], []
            self.start_sampler()
            return self.decode(self.latents[0])

    @torch.no_grad()
    def step(self, actions):
        """Advance every world by one latent action, actions (B,) ints; returns the new frames."""
        actions = torch.as_tensor(actions, device=self.device).long().view(-1)
        with autocast(self.device):
            if self.sampler.holder is not self:
                self.start_sampler()
            self.latents.append(self.advance(actions))
            self.actions.append(actions)
            return self.decode(self.latents[-1])

    @torch.no_grad()
    def undo(self):
        """Go back one step (never past the prompt); the sampler starts again from the last context frames."""
        if len(self.latents) > 1:
            self.latents.pop()
            self.actions.pop()
        with autocast(self.device):
            self.start_sampler()
            return self.decode(self.latents[-1])


class GenieWorld(World):
    """The Genie world (train_genie.py): tokenizer/ and dynamics/; a step is MaskGIT decoding of the next frame's
    tokens by dynamics.Sampler, against the cached context."""

    def __init__(self, tokenizer, dynamics, maskgit_steps=8, temperature=0.0, cfg_scale=GENIE_CFG_SCALE, seed=0,
                 meaning=None, sampler=None):
        self.tokenizer, self.dynamics = tokenizer, dynamics
        self.device = next(dynamics.parameters()).device
        super().__init__(dynamics.config.num_actions, (tokenizer.config.image_size,) * 2,
                         sampler or Sampler(dynamics, maskgit_steps, temperature, cfg_scale=cfg_scale), seed, meaning)

    @classmethod
    def load(cls, models, device=None, controls="latent", **options):
        device = get_device(device)
        dynamics = load_model(Dynamics, Path(models) / "dynamics", device)
        return cls(load_model(Tokenizer, Path(models) / "tokenizer", device), dynamics,
                   meaning=world_meaning(models, dynamics.config, controls), **options)

    def compile(self):
        """Compile what runs for every step (utils.compile_step), for this world and those it spawns: the dynamics'
        cached MaskGIT step, which also serves the frame's commit to the cache, and the tokenizer's decode."""
        self.dynamics.hidden = compile_step(self.dynamics.hidden, self.device)
        self.tokenizer.decode = compile_step(self.tokenizer.decode, self.device)

    def spawn(self, seed):
        return GenieWorld(self.tokenizer, self.dynamics, seed=seed, meaning=self.meaning, sampler=self.sampler)

    def encode(self, x):  # (B, 3, H, W) -> tokens (B, rows, cols)
        return self.tokenizer.encode(x)

    def decode(self, tokens):
        return to_uint8(self.tokenizer.decode(tokens))

    def advance(self, actions):
        return self.sampler.step(actions, self.generator)

    def start_sampler(self):
        """The sampler continues from this world's last context - 1 frames and the actions between them."""
        frames = self.latents[-(self.dynamics.config.context - 1):]
        actions = self.actions[len(self.actions) - (len(frames) - 1):]
        actions = torch.stack(actions, 1) if actions else frames[0].new_zeros(len(frames[0]), 0)
        self.sampler.start(torch.stack(frames, 1), actions)
        self.sampler.holder = self


class DiffusionWorld(World):
    """The diffusion world of a models folder (vae2/, dit/ trained with --lam, lam/). A step is one frame of
    dit.Sampler led to by the chosen latent action: its Euler steps run the DiT on the new frame's tokens only, against
    the key/value cache of the last seq_len - 1 frames; the VAE decodes it."""

    def __init__(self, vae, model, steps=EULER_STEPS, cfg_scale=CFG_SCALE, seed=0, meaning=None, sampler=None):
        self.vae, self.model = vae, model
        self.device = next(model.parameters()).device
        super().__init__(model.config.num_actions, (vae.config.height, vae.config.width),
                         sampler or dit.Sampler(model, steps, cfg_scale=cfg_scale), seed, meaning)

    @classmethod
    def load(cls, models, device=None, controls="latent", **options):
        device = get_device(device)
        vae, model, _ = load_world(models, device)
        if not model.config.num_actions:
            raise UserError(f"{models}/dit takes no actions, so it cannot be played: train it with train_dit.py --lam "
                            f"or --actions true")
        return cls(vae, model, meaning=world_meaning(models, model.config, controls), **options)

    def compile(self):
        compile_world(self.vae, self.model, self.device)

    def spawn(self, seed):
        return DiffusionWorld(self.vae, self.model, seed=seed, meaning=self.meaning, sampler=self.sampler)

    def encode(self, x):  # (B, 3, H, W) -> scaled latents (B, 1, N, C): the VAE's means
        return (self.vae.encode(x)[0].float() * self.model.config.latent_scale)[:, None]

    def decode(self, latents):
        return decode_frame(self.vae, self.model, latents)

    def advance(self, actions):
        return self.sampler.next_frame(actions)

    def start_sampler(self):
        """The sampler continues from this world's last seq_len - 1 frames and the actions that led to them (the
        prompt's: none)."""
        frames = self.latents[-self.sampler.window:]
        first = len(self.latents) - len(frames)  # the window's first frame; frame k > 0 was led to by actions[k - 1]
        led_to = [self.actions[first - 1][:, None] if first else self.model.no_action(frames[0][:, :, 0, 0])]
        led_to += [a[:, None] for a in self.actions[first:]]
        self.sampler.start(torch.cat(frames, 1), self.generator, torch.cat(led_to, 1))
        self.sampler.holder = self


def load_any_world(models, device, options):
    """The world in a models folder: Genie's (tokenizer/, dynamics/) or diffusion's (vae2/, dit/), with the options
    of its kind (options: {"genie": {...}, "diffusion": {...}})."""
    root = model_folder(models)
    if (root / "dynamics").is_dir():
        return GenieWorld.load(root, device, **options["genie"])
    if (root / "dit").is_dir():
        return DiffusionWorld.load(root, device, **options["diffusion"])
    raise UserError(f"{models} holds no world to play: neither tokenizer/ and dynamics/ (train_genie.py) nor vae2/, "
                    f"dit/ and lam/ (train_vae.py, train_lam.py, train_dit.py --lam)")


# What each key of the page asks for, in order of preference: an effect name of dataset.action_effect, or a word of one.
KEY_EFFECTS = {"ArrowLeft": ["left"], "ArrowRight": ["right"], "ArrowUp": ["jump", "up"], " ": ["jump", "fire"],
               "ArrowDown": ["down", "none"]}


def world_meaning(models, config, controls="latent"):
    """What each action of a world does: for one trained on the game's true actions, what its name says
    (dataset.action_effect), with the name; for a latent world, read_meaning, or with controls "game" the keys
    evaluate.py genie fitted from labelled transitions (MODELS/controls.json)."""
    if config.actions != "true" and controls == "game":
        meaning = read_meaning(models, "controls.json")
        if meaning is None:
            raise UserError(f"--controls game: {Path(models) / 'controls.json'} does not exist; fit the game's keys to "
                            f"the latent actions with python evaluate.py genie DATA --models {models}")
        return meaning
    if config.actions != "true":
        return read_meaning(models)
    return [dict(action=a, effect=action_effect(name, config.game)[1], share=1.0, name=name)
            for a, name in enumerate(config.action_names)]


def read_meaning(models, name="meaning.json"):
    """What each latent action most often did, as evaluate.py (genie or dit) wrote it to MODELS/meaning.json (on
    held-out data) or MODELS/controls.json (from --labels labelled transitions):
    [{"action", "effect", "share", "count"}, ...]; None when the models have not been evaluated."""
    path = Path(models) / name
    if not path.exists():
        return None
    try:
        return [dict(action=int(m["action"]), effect=str(m["effect"]), share=float(m["share"]))
                for m in json.loads(path.read_text())["meaning"]]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not the meaning table evaluate.py writes; delete it or rerun evaluate.py") from None


def action_labels(meaning, num_actions):
    """A label per action: '3: right + jump (71 %)' with a latent world's meaning, '5: UP' in a true-action world,
    '3' without."""
    effects = {m["action"]: m.get("name") or f"{m['effect']} ({m['share']:.0%})" for m in meaning or []}
    return [f"{a}: {effects[a]}" if a in effects else str(a) for a in range(num_actions)]


def default_keymap(meaning):
    """The arrow keys and space -> the action that means what the key asks for (KEY_EFFECTS): of those whose effect is
    exactly that, else of those whose effect includes it, the one with the largest share (of a game's own actions,
    all sure, NOOP and then the shortest name: LEFT rather than DOWN+LEFT, which procgen plays alike); -1 for none."""
    keymap = {}
    for key, wanted in KEY_EFFECTS.items():
        keymap[key] = -1
        for matches in (lambda m, w: m["effect"] == w, lambda m, w: w in m["effect"].split(" + ")):
            found = [m for w in wanted for m in meaning or [] if matches(m, w)]
            if found:
                keymap[key] = max(found, key=lambda m: (m["share"], m.get("name") == "NOOP",
                                                        -len(m.get("name", ""))))["action"]
                break
    return keymap


def prompt_frame(args, rng, size):
    """The first frame, (H, W, 3) uint8 of size (H, W): --image, or a random frame of --data's held-out levels
    (--use_dataset_frame)."""
    if args.image:
        image = cv2.imread(str(args.image), cv2.IMREAD_COLOR)
        if image is None:
            raise UserError(f"--image {args.image} is not an image file that OpenCV can read")
        return cv2.resize(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), size[::-1], interpolation=cv2.INTER_AREA)
    store = open_frames(args.data, size=size[::-1])
    require_size(store, size[1], size[0])
    ranges = split_episodes(store, "val") or store.episodes()
    start, end = ranges[rng.integers(len(ranges))]
    return np.array(store.frames[rng.integers(start, end)])


def enlarge(frames):
    """Frames (..., H, W, 3) of a small world (Genie's 64x64) enlarged 4x with nearest-neighbour, so the pixels stay
    crisp in PNGs and videos; a world of 256 px or wider as it is."""
    scale = max(1, 256 // frames.shape[-2])
    return frames.repeat(scale, axis=-3).repeat(scale, axis=-2)


def save_frame(path, frame):
    cv2.imwrite(str(path), cv2.cvtColor(enlarge(frame), cv2.COLOR_RGB2BGR))


def play_batch(world, first, actions, out):
    frames = [world.reset(first[None])[0]]
    for action in actions:
        frames.append(world.step([action])[0])
    for i, frame in enumerate(frames):
        save_frame(out / f"frame_{i:04d}.png", frame)
    video = enlarge(np.stack(frames))
    write_gif(out / "rollout.gif", video, fps=8)
    write_mp4(out / "rollout.mp4", video, fps=8)
    print(f"wrote {len(frames)} frames (prompt + {len(actions)} steps) to {out}: frame_*.png, rollout.gif, rollout.mp4")


def play_terminal(world, new_prompt, out):
    """Keys 0..9 step the world by that action and, once the world's actions have a meaning, the arrows and space by
    the action they stand for (default_keymap); r resets to a new prompt frame, q quits; the frame is written after
    every step. Reads single keys from a terminal, or characters from piped input."""
    keys = sys.stdin
    if sys.stdin.isatty():
        import termios
        import tty
        saved = termios.tcgetattr(sys.stdin)
        tty.setcbreak(sys.stdin)
    keymap = {k: a for k, a in default_keymap(world.meaning).items() if a >= 0} if world.meaning else {}
    arrows = {"[A": "ArrowUp", "[B": "ArrowDown", "[C": "ArrowRight", "[D": "ArrowLeft"}  # after ESC
    labels = action_labels(world.meaning, world.num_actions)
    keys_named = "".join(f", {'space' if k == ' ' else k[5:].lower()} {labels[a]}" for k, a in keymap.items())
    print(f"keys: 0-{min(9, world.num_actions - 1)} act ({', '.join(labels)}){keys_named}, r reset, q quit; "
          f"current frame: {out / 'current.png'}")
    try:
        frame, step = world.reset(new_prompt()[None])[0], 0
        save_frame(out / "current.png", frame)
        while True:
            key = keys.read(1)
            if key in ("", "q"):
                break
            action = int(key) if key.isdigit() else keymap.get(arrows.get(keys.read(2)) if key == "\x1b" else key)
            if key == "r":
                frame, step = world.reset(new_prompt()[None])[0], 0
            elif action is not None and action < world.num_actions:
                frame, step = world.step([action])[0], step + 1
                save_frame(out / f"step_{step:04d}.png", frame)
            else:
                continue
            save_frame(out / "current.png", frame)
            print(f"step {step}: {'reset' if key == 'r' else f'action {labels[action]}'}", flush=True)
    finally:
        if sys.stdin.isatty():
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)

class WebSession:
    """One browser tab: its own world and the frames shown so far (for undo and the download)."""

    def __init__(self, world, first_frame):
        self.world, self.frames = world, [world.reset(first_frame[None])[0]]


def warm_up(world):
    """One reset, step and undo of a throwaway world on the same models."""
    scratch = world.spawn(0)
    scratch.reset(np.zeros((1, *world.frame_size, 3), np.uint8))
    scratch.step([0])
    scratch.undo()


def png_data_url(frame):
    return "data:image/png;base64," + base64.b64encode(cv2.imencode(".png", frame[..., ::-1])[1]).decode()


def serve_web(world, new_prompt, host, port, open_browser, max_sessions=16):
    """Serve play.html and a small JSON API; every action is one POST answered with the new frame.

    Why plain HTTP requests: the world advances only when an action arrives, so request/response is the natural shape,
    a 64x64 PNG is ~4 kB (a 320x180 one ~40 kB), and it needs nothing but the standard library on the server and fetch() in the page; it goes
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
            frames = enlarge(frames)
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
    parser = argparse.ArgumentParser(description="Play a trained world: a Genie world (train_genie.py) or a diffusion "
                                                 "world (train_dit.py --lam, or --actions true), with its latent "
                                                 "actions or with the game's own keys.")
    parser.add_argument("--models", default="models/genie",
                        help="folder with tokenizer/ and dynamics/ (train_genie.py), or with vae2/, dit/ and lam/ "
                             "(a diffusion world; default models/genie)")
    parser.add_argument("--actions", help="batch mode: comma-separated actions, e.g. '3,3,1,0'; a world trained on "
                                          "the game's true actions also takes their names, e.g. 'RIGHT,RIGHT,UP'")
    parser.add_argument("--controls", choices=["latent", "game"], default="latent",
                        help="a latent world's keys: latent, number keys press latent actions and the arrows those "
                             "evaluate.py measured to mean left, right, jump, none (MODELS/meaning.json); game, the "
                             "arrows and space as fitted from labelled transitions (MODELS/controls.json, by "
                             "evaluate.py genie --labels). A world trained on the true actions has the game's own "
                             "(default latent)")
    parser.add_argument("--image", help="prompt frame (PNG/JPEG, resized to the world's frame size)")
    parser.add_argument("--use_dataset_frame", action="store_true",
                        help="prompt with a random frame of --data's held-out levels (the default without --image)")
    parser.add_argument("--data", help="frame store or video for --use_dataset_frame (default videos/coinrun for a "
                                       "Genie world, videos/coinrun_wide for a diffusion world)")
    parser.add_argument("--output_dir", default="outputs", help="where frames, gif and mp4 are written")
    parser.add_argument("--ui", default="web", choices=["web", "terminal"],
                        help="interactive front end: a page in the browser (default) or keys in this terminal")
    parser.add_argument("--host", default="127.0.0.1", help="web: address to listen on (default 127.0.0.1 only)")
    parser.add_argument("--port", type=int, default=8765, help="web: port (default 8765; 0 picks a free one)")
    parser.add_argument("--no_browser", action="store_true", help="web: do not open a browser even with a display")
    parser.add_argument("--maskgit_steps", type=positive(int), default=8,
                        help="Genie: parallel decoding steps per frame (default 8)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="Genie: sampling temperature of the next frame's tokens (default 0: the most likely ones)")
    parser.add_argument("--steps", type=positive(int), default=EULER_STEPS,
                        help="diffusion: Euler steps per frame; more are slower and, at the demo scale, no better "
                             f"(default {EULER_STEPS}; the README's table)")
    parser.add_argument("--cfg_scale", type=float,
                        help="classifier-free guidance of the latent actions, 1 = none (default: "
                             f"{GENIE_CFG_SCALE:g} for a Genie world, {CFG_SCALE:g} for a diffusion world)")
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt choice and the sampling")
    add_step_compile_flag(parser)
    args = parser.parse_args()
    if args.cfg_scale is not None and args.cfg_scale < 0:
        raise UserError(f"--cfg_scale must be at least 0, not {args.cfg_scale:g}")
    seed_everything(args.seed)
    guidance = {} if args.cfg_scale is None else dict(cfg_scale=args.cfg_scale)
    world = load_any_world(args.models, args.device, {
        "genie": dict(maskgit_steps=args.maskgit_steps, temperature=args.temperature, seed=args.seed,
                      controls=args.controls, **guidance),
        "diffusion": dict(steps=args.steps, seed=args.seed, controls=args.controls, **guidance)})
    args.data = args.data or ("videos/coinrun" if isinstance(world, GenieWorld) else "videos/coinrun_wide")
    if args.compile:
        world.compile()
        print("--compile: the first step compiles, which takes a minute or two", file=sys.stderr, flush=True)
    names = [m["name"] for m in world.meaning] if world.meaning and "name" in world.meaning[0] else ()
    actions = parse_actions(args.actions, world.num_actions, names) if args.actions is not None else None
    rng = np.random.default_rng(args.seed)
    first = prompt_frame(args, rng, world.frame_size)
    out = Path(args.output_dir)
    if actions is not None or args.ui == "terminal":
        out.mkdir(parents=True, exist_ok=True)
    if actions is not None:
        play_batch(world, first, actions, out)
    else:
        unused = [first]

        def new_prompt():
            return unused.pop() if unused else prompt_frame(args, rng, world.frame_size)
        if args.ui == "web":
            serve_web(world, new_prompt, args.host, args.port, not args.no_browser)
        else:
            play_terminal(world, new_prompt, out)


if __name__ == "__main__":
    run_cli(main)
