"""What only a CUDA GPU can show; every test here is skipped without one. `make gpu-check` runs them (and bench.py)
on a rented GPU and collects their figures in results/gpu_check.json through GAMEWORLD_GPU_FIGURES, a folder.

  - every default preset trains a few steps at its default batch with the planned micro-batch and checkpointing,
    its measured peak memory next to memory.py's estimate;
  - compiled generation and play (CUDA graphs) give the eager frames within bf16 round-off, cached = uncached;
  - play sessions, resets and undo replay the recorded CUDA graphs and record no new ones;
  - a training run killed with SIGTERM on the GPU resumes to the weights of an uninterrupted one (--deterministic);
  - guided DiT generation compiled as CUDA graphs gives the eager frames.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import dit
import dynamics
import memory
import train_dit
import train_genie
import train_vae
import vae
from conftest import ROOT, run
from generate import compile_world
from play import GenieWorld, warm_up
from step import checkpoint_blocks, make_optimizer, train_step
from vae2 import PRESETS as VAE2_PRESETS, ViTVAE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check on one)")
CUDA = torch.device("cuda")


def record(name, figures):
    folder = os.environ.get("GAMEWORLD_GPU_FIGURES")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.json").write_text(json.dumps(figures, indent=1))


@pytest.mark.parametrize("name", bench.MODELS)
def test_a_default_preset_trains_at_its_default_batch_within_the_estimate(name):
    defaults = {"vae2": train_vae.DEFAULTS, "dit": train_dit.DEFAULTS}.get(name, train_genie.DEFAULTS)
    batch_size = defaults["default"]["batch_size"]
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(CUDA)
    budget = memory.budget(total, free)
    found = memory.plan(lambda m: bench.training_inputs(name, "default", m, None)[:2], bench.forward, batch_size,
                        budget, ema=name == "dit", device="cuda")
    assert found["fits"], found
    torch.manual_seed(0)
    model, batch, _ = bench.training_inputs(name, "default", batch_size, CUDA)
    model = model.to(CUDA).train()
    ema = type(model)(model.config).to(CUDA).requires_grad_(False) if name == "dit" else None
    if found["checkpoint_blocks"]:
        checkpoint_blocks(model)
    optimizer = make_optimizer(model, 1e-4)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for step in (1, 2, 3):
        loss, *_ = train_step(model, model, optimizer, bench.forward, batch, step, CUDA, ema, 0.999 if ema is not None else None,
                              micro_batches=batch_size // found["micro_batch"])
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.max_memory_reserved()  # what the allocator held: the tensors and its fragmentation
    estimated = found["estimate"]["peak"]
    figures = {"model": name, "batch_size": batch_size, "micro_batch": found["micro_batch"],
               "checkpoint_blocks": found["checkpoint_blocks"], "estimated_gb": estimated / memory.GB,
               "measured_gb": measured / memory.GB, "reserved_gb": reserved / memory.GB,
               "ratio": estimated / measured, "budget_gb": budget / memory.GB, "loss": loss.item()}
    record(f"memory_{name}", figures)
    assert torch.isfinite(loss) and reserved <= budget, figures
    assert 0.85 <= estimated / measured <= 1.25, figures  # the target is within 15 %


@torch.no_grad()
def test_compiled_generation_gives_the_eager_frames_and_cached_the_uncached():
    torch.manual_seed(0)
    model = dit.DiT(dit.PRESETS["default"]).to(CUDA).eval()
    vae2 = ViTVAE(VAE2_PRESETS["default"]).to(CUDA).eval()
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero's zero init makes every block the identity: perturb it
            p.add_(0.02 * torch.randn_like(p))
    context = torch.randn(1, 5, 220, 48, device=CUDA)
    latents = {}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for cached in (False, True):
            latents[cached] = dit.Sampler(model, steps=4, cached=cached).rollout(
                context, 3, generator=torch.Generator(CUDA).manual_seed(1))
        compile_world(vae2, model, CUDA)
        latents["compiled"] = dit.Sampler(model, steps=4).rollout(context, 3,
                                                                  generator=torch.Generator(CUDA).manual_seed(1))
    scale = latents[False].float().abs().mean().item()
    errors = {k: (latents[k].float() - latents[False].float()).abs().mean().item() / scale for k in (True, "compiled")}
    record("generation_agreement", {"cached_vs_uncached": errors[True], "compiled_vs_eager": errors["compiled"]})
    assert errors[True] < 0.05 and errors["compiled"] < 0.05, errors  # bf16: about 1 % per step


@torch.no_grad()
def test_guided_generation_compiled_as_cuda_graphs_gives_the_eager_frames():
    # guidance runs both branches in one call: a second call of a CUDA graph may overwrite the first one's outputs
    torch.manual_seed(0)
    config = dataclasses.replace(dit.PRESETS["default"], num_actions=8)
    model, vae2 = dit.DiT(config).to(CUDA).eval(), ViTVAE(VAE2_PRESETS["default"]).to(CUDA).eval()
    for p in model.parameters():
        p.add_(0.02 * torch.randn_like(p))
    context = torch.randn(1, 5, 220, 48, device=CUDA)
    actions = torch.randint(8, (1, 8), device=CUDA)
    latents = {}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        latents["eager"] = dit.Sampler(model, steps=4, cfg_scale=3).rollout(
            context, 3, generator=torch.Generator(CUDA).manual_seed(1), actions=actions)
        compile_world(vae2, model, CUDA)
        for _ in range(2):  # cudagraph trees record on a graph's second call: the second run replays
            latents["compiled"] = dit.Sampler(model, steps=4, cfg_scale=3).rollout(
                context, 3, generator=torch.Generator(CUDA).manual_seed(1), actions=actions)
    scale = latents["eager"].float().abs().mean().item()
    error = (latents["compiled"].float() - latents["eager"].float()).abs().mean().item() / scale
    record("guided_generation_agreement", {"compiled_vs_eager": error})
    assert error < 0.05, error


@torch.no_grad()
def test_compiled_play_replays_its_cuda_graphs_across_sessions_resets_and_undo(monkeypatch):
    from torch._inductor import cudagraph_trees
    recordings = []
    original = cudagraph_trees.CUDAGraphNode._record
    monkeypatch.setattr(cudagraph_trees.CUDAGraphNode, "_record",
                        lambda self, *args: (recordings.append(1), original(self, *args))[1])
    torch.manual_seed(0)
    tokenizer = vae.Tokenizer(vae.PRESETS["default"]).to(CUDA).eval()
    config = dataclasses.replace(dynamics.PRESETS["default"], vocab_size=tokenizer.config.num_codes,
                                 rows=tokenizer.config.grid, cols=tokenizer.config.grid)
    world = GenieWorld(tokenizer, dynamics.Dynamics(config).to(CUDA).eval(), maskgit_steps=8)
    eager = [world.reset(np.zeros((1, 64, 64, 3), np.uint8))] + [world.step([a]) for a in (1, 2, 3)]
    world.compile()
    warm_up(world)
    warm_up(world)  # cudagraph trees record on a graph's second call
    after_warm_up = len(recordings)
    prompts = np.random.default_rng(0).integers(0, 256, (2, 1, 64, 64, 3), dtype=np.uint8)
    first, second = world.spawn(1), world.spawn(2)
    compiled = [first.reset(np.zeros((1, 64, 64, 3), np.uint8))] + [first.step([a]) for a in (1, 2, 3)]
    second.reset(prompts[1])
    for action in range(20):  # past the window, sessions in turn
        first.step([action % config.num_actions])
        second.step([(action + 3) % config.num_actions])
    first.undo()
    second.reset(prompts[0])
    started = time.perf_counter()
    for action in range(50):
        second.step([action % config.num_actions])
    steps_per_s = 50 / (time.perf_counter() - started)
    record("play_graphs", {"recordings_after_warm_up": len(recordings) - after_warm_up, "recordings": len(recordings),
                           "steps_per_s": steps_per_s})
    assert len(recordings) == after_warm_up, (after_warm_up, len(recordings))
    differing = np.mean([(np.abs(a.astype(int) - b) > 8).mean() for a, b in zip(eager, compiled)])
    assert differing < 0.05, differing  # greedy decoding: bf16 ties may flip a few tokens


def test_a_run_killed_on_the_gpu_resumes_to_the_same_weights(coinrun, tmp_path):
    common = ["train_genie.py", "--phase", "tokenizer", "--preset", "tiny", "--steps", 40, "--save_every", 5,
              "--data", coinrun, "--device", "cuda", "--deterministic", "--num_workers", 2, "--seed", 3]
    result = run(*common, "--out", tmp_path / "reference", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    process = subprocess.Popen([sys.executable, *map(str, common), "--out", tmp_path / "killed"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    while not list((tmp_path / "killed" / "checkpoints" / "tokenizer").glob("step_*.pt")) and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    process.communicate(timeout=300)
    result = run(*common, "--out", tmp_path / "killed", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = (tmp_path / "reference" / "tokenizer" / "model.safetensors").read_bytes()
    assert (tmp_path / "killed" / "tokenizer" / "model.safetensors").read_bytes() == reference
