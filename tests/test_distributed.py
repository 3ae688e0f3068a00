"""Training under torchrun: two CPU processes (gloo) must end with identical weights, and with the weights of one
process reading the same global batch, within float round-off."""
import os
import shutil
import subprocess
import sys
import time

from safetensors.torch import load_file

from conftest import ROOT, run
from training import CRASH_VARIABLE

TOLERANCE = 2e-5  # largest |difference| of any weight after 6 AdamW steps; measured 1.2e-6


def torchrun(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def largest_difference(a, b):
    a, b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_processes_match_one_process_with_the_same_global_batch(coinrun, tmp_path):
    # lr 3e-4, what TOLERANCE was measured at: the tiny tokenizer's default 2e-3 scales the rounding differences up
    args = ["train_genie.py", "--phase", "tokenizer", "--preset", "tiny", "--steps", 6, "--lr", 3e-4, "--data", coinrun,
            "--num_workers", 0, "--log_every", 3]
    for name, micro in (("two", []), ("two_micro", ["--micro_batch", 2])):  # micro-batches: DDP syncs the last only
        result = torchrun(*args, "--batch_size", 8, "--out", tmp_path / name, *micro)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "tokenizer: weights identical in all 2 processes" in result.stdout
    for batch, name in ((8, "one"), (4, "half")):
        result = run(*args, "--batch_size", batch, "--out", tmp_path / name)
        assert result.returncode == 0, result.stderr[-3000:]
    assert largest_difference(tmp_path / "two" / "tokenizer", tmp_path / "one" / "tokenizer") < TOLERANCE
    assert largest_difference(tmp_path / "two_micro" / "tokenizer", tmp_path / "one" / "tokenizer") < TOLERANCE
    # each process read its own half of the batch: one process reading half of it lands elsewhere
    assert largest_difference(tmp_path / "two" / "tokenizer", tmp_path / "half" / "tokenizer") > 50 * TOLERANCE  # measured 1.9e-3


def test_every_model_trains_under_torchrun(coinrun, diffusion_data, tmp_path):
    result = torchrun("train_genie.py", "--phase", "all", "--preset", "tiny", "--steps", 3, "--batch_size", 4,
                      "--data", coinrun, "--out", tmp_path / "genie", "--num_workers", 0)
    assert result.returncode == 0, result.stderr[-3000:]
    for phase in ("tokenizer", "lam", "dynamics"):
        assert f"{phase}: weights identical in all 2 processes" in result.stdout
    result = torchrun("train_dit.py", diffusion_data["latents"], "--vae", diffusion_data["vae"], "--preset", "tiny",
                      "--seq_len", 6, "--steps", 3, "--batch_size", 2, "--context_forcing", 2, "--out",
                      tmp_path / "dit", "--samples", tmp_path / "sample.mp4", "--num_workers", 0)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dit: weights identical in all 2 processes" in result.stdout
    result = torchrun("train_vae.py", diffusion_data["store"], "--preset", "tiny", "--steps", 3, "--batch_size", 3,
                      "--out", tmp_path / "vae2", "--num_workers", 0)
    # torchrun reports a worker's exit code 2 as its own failure (1); the worker's line says why
    assert result.returncode != 0 and "error: --batch_size 3 is the global batch and must divide among 2 processes" \
        in result.stderr


def test_a_frozen_parameter_trains_and_a_failing_process_ends_the_launch(coinrun, tmp_path):
    # without a context mask the transformer LAM's mask token is unused: DDP must not wait for its gradient (it failed
    # at step 2)
    common = ["train_genie.py", "--phase", "lam", "--preset", "tiny", "--batch_size", 4, "--data", coinrun,
              "--num_workers", 2]  # DataLoader workers: what once kept a failed process from exiting
    result = torchrun(*common, "--steps", 4, "--set", "lam.arch=transformer", "lam.context_mask=0",
                      "--out", tmp_path / "no_mask")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lam: weights identical in all 2 processes" in result.stdout
    started = time.time()
    result = torchrun(*common, "--steps", 20, "--out", tmp_path / "crash", env={CRASH_VARIABLE: "1:3"}, timeout=120)
    assert result.returncode != 0 and f"{CRASH_VARIABLE}: process 1 fails at step 3" in result.stderr
    assert time.time() - started < 60  # measured 6 s; it hung until killed before


def test_a_store_that_needs_encoding_is_encoded_once(diffusion_data, tmp_path):
    # a frame store without latents: rank 0 encodes it while the other process waits, then finds it encoded
    store = tmp_path / "footage"
    shutil.copytree(diffusion_data["store"], store)
    result = torchrun("train_lam.py", store, "--vae", diffusion_data["vae"], "--preset", "tiny", "--steps", 2,
                      "--batch_size", 2, "--seq_len", 3, "--num_workers", 0, "--out", tmp_path / "lam")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f"encoding the 300 frames of {store}") == 1, result.stdout
    assert "lam: weights identical in all 2 processes" in result.stdout


PLAN = """
import argparse, sys, torch
sys.path.insert(0, {root!r})
import bench, training
rank, world = training.distributed()
model, batch, _ = bench.training_inputs("lam", "tiny", 1, "cpu")
args = argparse.Namespace(batch_size=32, micro_batch=None, checkpoint_blocks=None, gpu_memory={budgets}[rank])
sample = {{k: v[0] for k, v in batch.items()}}
print("plan", training.step_settings(model, bench.forward, [sample], args, torch.device("cpu"), world, "lam", False))
"""


def test_processes_with_different_budgets_take_the_same_plan(tmp_path):
    # each process plans from its own GPU's free memory; plans that differ issue different numbers of collectives
    script = tmp_path / "plan.py"
    plans = {}
    for budgets in ([0.1, 40], [0.1, 0.1], [40, 40]):
        script.write_text(PLAN.format(root=str(ROOT), budgets=budgets))
        result = torchrun(script)
        assert result.returncode == 0, result.stderr[-3000:]
        plans[str(budgets)] = sorted(line for line in result.stdout.splitlines() if line.startswith("plan"))
    assert plans["[0.1, 40]"] == plans["[0.1, 0.1]"] != plans["[40, 40]"], plans
    assert len(set(plans["[0.1, 40]"])) == 1
