"""Bad input: a one-line error naming the problem, exit code 2, no traceback, and nothing half-written left behind."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, assert_user_error, run


def leftovers(folder):
    """Temporary files or folders of an atomic write that were not cleaned up."""
    return [p.name for p in folder.iterdir() if ".tmp" in p.name or ".old-" in p.name]


@pytest.fixture
def bad_files(coinrun_video, tmp_path):
    data = coinrun_video.read_bytes()
    files = {"empty": b"", "truncated": data[: len(data) // 2], "text": b"these are not the frames you are looking for\n"}
    for name, content in files.items():
        (tmp_path / f"{name}.mp4").write_bytes(content)
    return tmp_path


@pytest.mark.parametrize("name, message", [("missing", "does not exist"), ("empty", "is empty"),
                                           ("truncated", "not a video"), ("text", "not a video")])
def test_download_refuses_bad_files(bad_files, name, message):
    out = bad_files / "videos"
    assert_user_error(run("download.py", bad_files / f"{name}.mp4", "--out", out), message)
    assert_user_error(run("download.py", (bad_files / f"{name}.mp4").as_uri(), "--out", out), message)
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.parametrize("name, message", [("missing", "does not exist"), ("empty", "is empty"),
                                           ("truncated", "not a video"), ("text", "not a video")])
def test_prepare_refuses_bad_files_and_leaves_no_store(bad_files, name, message):
    out = bad_files / "store"
    assert_user_error(run("dataset.py", "prepare", bad_files / f"{name}.mp4", "--out", out), message)
    assert not out.exists() and not leftovers(bad_files)


def test_download_unreachable_url(tmp_path):
    # Port 9 (discard) on loopback: nothing listens, so the connection is refused at once.
    result = run("download.py", "http://127.0.0.1:9/clip.mp4", "--out", tmp_path)
    assert_user_error(result, "could not download http://127.0.0.1:9/clip.mp4")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("source, message", [("procgen:notagame", "unknown procgen game 'notagame'"),
                                             ("ale:notagame", "unknown ALE game 'notagame'")])
def test_unknown_game(source, message, tmp_path):
    assert_user_error(run("download.py", source, "--frames", 10, "--out", tmp_path / "s"), message)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("args, message", [
    (["download.py", "procgen:coinrun", "--frames", "0"], "--frames: invalid positive int value: '0'"),
    (["download.py", "procgen:coinrun", "--frames", "-5"], "--frames: invalid positive int value: '-5'"),
    (["download.py", "procgen:coinrun", "--size", "64by64"], "--size must be WIDTHxHEIGHT"),
    (["dataset.py", "prepare", "CLIP", "--size", "320by180"], "--size must be WIDTHxHEIGHT"),
    (["dataset.py", "prepare", "CLIP", "--size", "0x180"], "--size must be positive"),
    (["dataset.py", "prepare", "CLIP", "--fps", "0"], "--fps: invalid positive float value: '0'"),
    (["dataset.py", "prepare", "CLIP", "--fps", "-12"], "--fps: invalid positive float value: '-12'"),
])
def test_bad_flag_values(args, message, coinrun_video, tmp_path):
    args = [str(coinrun_video) if a == "CLIP" else a for a in args]
    assert_user_error(run(*args, "--out", tmp_path / "s"), message)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("setting, message", [
    ("depht=4", "--set depht=4: DiTConfig has no field 'depht'; fields: action_dropout, action_names, actions, cols, depth,"),
    ("depth=four", "--set depth=four: depth takes int values, like 2"),
    ("depth", "--set takes FIELD=VALUE, not 'depth'"),
    ("heads=5", "DiT: dim 64 / heads 5 must be a whole multiple of 4"),
])
def test_train_dit_refuses_bad_settings(setting, message, diffusion_data, tmp_path):
    assert_user_error(run("train_dit.py", diffusion_data["latents"], "--vae", diffusion_data["vae"], "--preset", "tiny",
                          "--set", setting, "--out", tmp_path / "dit"), message)
    assert not list(tmp_path.iterdir())


def test_settings_land_in_the_model_folder_and_bad_ones_are_refused(coinrun, tmp_path):
    argv = ["train_genie.py", "--phase", "tokenizer", "--preset", "tiny", "--steps", 2, "--batch_size", 4,
            "--data", coinrun, "--out", tmp_path / "genie", "--num_workers", 0]
    assert_user_error(run(*argv, "--set", "vae.channels=8"), "--set takes PHASE.FIELD=VALUE with PHASE in tokenizer")
    assert_user_error(run(*argv, "--set", "lam.dead_after=soon"), "dead_after takes int values, like 50")
    lam = [a if a != "tokenizer" else "lam" for a in argv]
    assert_user_error(run(*lam, "--set", "lam.context_mask=1.5"), "context_mask 1.5 lie in [0, 1)")
    assert not (tmp_path / "genie").exists()
    result = run(*argv, "--set", "tokenizer.dead_after=7", "tokenizer.channel_mult=[1,2,4]")
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "genie" / "tokenizer" / "config.json").read_text())
    assert config["dead_after"] == 7 and config["channel_mult"] == [1, 2, 4]


def test_collect_refuses_to_overwrite_an_existing_store(coinrun):
    before = (coinrun / "frames.u8").stat().st_mtime_ns
    assert_user_error(run("download.py", "procgen:coinrun", "--frames", 10, "--out", coinrun), "already exists")
    assert (coinrun / "frames.u8").stat().st_mtime_ns == before


def corrupt(store, tmp_path, how):
    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    if how == "truncated frames":
        with open(bad / "frames.u8", "r+b") as f:
            f.truncate(os.path.getsize(bad / "frames.u8") - 1000)
    elif how == "count disagrees":
        meta = json.loads((bad / "meta.json").read_text())
        meta["count"] += 1
        (bad / "meta.json").write_text(json.dumps(meta))
    elif how == "bad episode starts":
        meta = json.loads((bad / "meta.json").read_text())
        meta["episode_starts"] = [5, 3]
        (bad / "meta.json").write_text(json.dumps(meta))
    elif how == "truncated actions":
        np.save(bad / "actions.npy", np.zeros(7, np.int64))
    elif how == "malformed meta":
        (bad / "meta.json").write_text("{ not json")
    return bad


@pytest.mark.parametrize("how, message", [("truncated frames", "truncated or foreign"),
                                          ("count disagrees", "truncated or foreign"),
                                          ("bad episode starts", "episode_starts must ascend"),
                                          ("truncated actions", "has shape (7,)"),
                                          ("malformed meta", "meta.json is malformed")])
def test_store_that_disagrees_with_its_meta_is_refused(coinrun, tmp_path, how, message):
    bad = corrupt(coinrun, tmp_path, how)
    assert_user_error(run("dataset.py", "info", bad), message)
    assert_user_error(run("dataset.py", "preview", bad, "--out", tmp_path / "p.mp4"), message)


def test_ctrl_c_during_collection_leaves_no_store(tmp_path):
    out = tmp_path / "coinrun"
    # As a terminal's foreground job: SIGINT at its default, which a shell running the tests in the background sets
    # to ignored (Python then raises no KeyboardInterrupt). PYTHONFAULTHANDLER: on a hang SIGABRT shows where it is.
    process = subprocess.Popen([sys.executable, "download.py", "procgen:coinrun", "--frames", "5000000",
                                "--num_envs", "16", "--out", str(out)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONFAULTHANDLER": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):  # collection has started writing
        assert time.time() < deadline and process.poll() is None, "collector did not start"
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        pytest.fail("still running 120 s after SIGINT; its threads:\n" + process.communicate()[1][-4000:])
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr.strip().splitlines()[-1]
    assert not out.exists() and not list(tmp_path.iterdir())
