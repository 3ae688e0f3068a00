"""Shared fixtures: real CoinRun frames collected once per test session, a real OpenCV-written video, and a helper
that runs the project's scripts as the user would (a subprocess, exit code and stderr checked)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(*args, cwd=ROOT, timeout=300, env=None):
    """Run `python SCRIPT ARGS...` from the repo root, with `env` added to the environment; returns the
    CompletedProcess (text output)."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def assert_user_error(result, message):
    """A user mistake: exit code 2, no traceback, and the last stderr line names the problem."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "error:" in last and message in last, last


@pytest.fixture(scope="session")
def coinrun(tmp_path_factory):
    """600 real CoinRun frames (4 envs x 150 steps) with true actions, episode starts and levels."""
    out = tmp_path_factory.mktemp("data") / "coinrun"
    result = run("download.py", "procgen:coinrun", "--frames", 600, "--num_envs", 4, "--seed", 1, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def write_video(path, frames, fps):
    """Write uint8 RGB frames (N, H, W, 3) as an mp4v video with OpenCV."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (frames.shape[2], frames.shape[1]))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def read_video(path):
    """All frames of a video as uint8 RGB (N, H, W, 3)."""
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            return np.stack(frames)
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))


@pytest.fixture(scope="session")
def wide_frames(tmp_path_factory):
    """75 frames of CoinRun gameplay rendered by procgen at 320x180: (75, 180, 320, 3) uint8."""
    from dataset import FrameStore
    out = tmp_path_factory.mktemp("data") / "coinrun_320x180"
    result = run("download.py", "procgen:coinrun", "--frames", 75, "--num_envs", 1, "--size", "320x180", "--out", out)
    assert result.returncode == 0, result.stderr
    frames = np.array(FrameStore(out).frames)
    assert frames.shape == (75, 180, 320, 3)
    return frames


@pytest.fixture(scope="session")
def coinrun_video(wide_frames, tmp_path_factory):
    """2.5 s of CoinRun gameplay at 320x180 (75 frames), written by OpenCV as a real mp4 at 30 fps."""
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", wide_frames, 30)


@pytest.fixture(scope="session")
def genie(tmp_path_factory):
    """Collect 4000 CoinRun frames and train all three phases for 40 steps each through train_genie.py."""
    root = tmp_path_factory.mktemp("genie")
    result = run("train_genie.py", "--phase", "all", "--preset", "tiny", "--steps", 40, "--batch_size", 8,
                 "--frames", 4000, "--data", root / "coinrun", "--out", root / "models", "--num_workers", 0,
                 "--log_every", 5, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture(scope="session")
def diffusion_data(tmp_path_factory):
    """The latent diffusion pipeline's inputs, made through the real CLIs: a 320x180 CoinRun store of 300 frames
    (3 envs, seed 1: 4 episodes, one of them on a held-out level), a tiny ViT-VAE trained on it for 30 steps, and the
    store's latents from `dataset.py encode`. Returns {"store", "vae", "latents"} as Paths; the VAE's reconstruction
    picture is vae2_recon.png beside them."""
    root = tmp_path_factory.mktemp("diffusion")
    store, vae = root / "coinrun_wide", root / "vae2"
    result = run("download.py", "procgen:coinrun", "--frames", 300, "--num_envs", 3, "--seed", 1, "--size", "320x180",
                 "--out", store)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run("train_vae.py", store, "--preset", "tiny", "--steps", 30, "--batch_size", 4, "--out", vae,
                 "--samples", root / "vae2_recon.png", "--num_workers", 0, "--log_every", 10)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run("dataset.py", "encode", store, "--vae", vae, "--batch_size", 50)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"store": store, "vae": vae, "latents": root / "coinrun_wide_latents"}


@pytest.fixture(scope="session")
def steerable_world(diffusion_data, tmp_path_factory):
    """A playable diffusion world as train_lam.py and train_dit.py --lam leave it: models/{vae2,lam,dit}, a tiny LAM
    and a tiny DiT conditioned on its actions, a few steps each on a copy of diffusion_data's latents (so that the
    labels written into the store do not meet other tests'). Returns the models folder."""
    root = tmp_path_factory.mktemp("steerable")
    models, latents = root / "models", root / "coinrun_wide_latents"
    shutil.copytree(diffusion_data["vae"], models / "vae2")
    shutil.copytree(diffusion_data["latents"], latents)
    result = run("train_lam.py", latents, "--vae", models / "vae2", "--preset", "tiny", "--steps", 4, "--batch_size", 4,
                 "--seq_len", 3, "--num_workers", 0, "--out", models / "lam")
    assert result.returncode == 0, result.stderr[-3000:]
    result = run("train_dit.py", latents, "--vae", models / "vae2", "--preset", "tiny", "--steps", 6, "--batch_size", 2,
                 "--seq_len", 6, "--lam", models / "lam", "--lam_seq_len", 3, "--num_workers", 0, "--out",
                 models / "dit", "--samples", root / "sample.mp4", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return models


@pytest.fixture(scope="session")
def true_genie(genie, tmp_path_factory):
    """The genie fixture's tokenizer, given a focus on the player (CoinRun's box, which only its training weighs), with
    a dynamics trained 20 steps on the store's true actions."""
    models = tmp_path_factory.mktemp("true_genie") / "models"
    shutil.copytree(genie / "models" / "tokenizer", models / "tokenizer")
    config = json.loads((models / "tokenizer" / "config.json").read_text())
    (models / "tokenizer" / "config.json").write_text(json.dumps({**config, "focus": [28, 20, 44, 44]}))
    result = run("train_genie.py", "--phase", "dynamics", "--actions", "true", "--preset", "tiny", "--steps", 20,
                 "--batch_size", 8, "--data", genie / "coinrun", "--out", models, "--num_workers", 0, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return models


@pytest.fixture(scope="session")
def true_dit(diffusion_data, tmp_path_factory):
    """A models folder with the diffusion fixture's VAE and a DiT trained 6 steps on the store's true actions, the
    clips with a turn drawn 4x."""
    models = tmp_path_factory.mktemp("true_dit") / "models"
    shutil.copytree(diffusion_data["vae"], models / "vae2")
    result = run("train_dit.py", diffusion_data["latents"], "--vae", models / "vae2", "--actions", "true", "--preset",
                 "tiny", "--steps", 6, "--batch_size", 2, "--seq_len", 6, "--oversample_turns", 4, "--num_workers", 0,
                 "--out", models / "dit", "--samples", models.parent / "sample.mp4", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return models
