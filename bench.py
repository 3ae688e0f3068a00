"""Speed measurements: a table on stdout and the figures as JSON. Timed tests do not exist; speed lives here.

  python bench.py cuda                                                      # does torch see the GPU? (make gpu-check)
  python bench.py train --model dit --preset tiny                          # CPU, seconds
  python bench.py train --model dit --preset default --device cuda --json results/bench_train_dit_h100.json
  python bench.py generate --preset tiny                                    # CPU, seconds
  python bench.py generate --preset default --frames 1 --runs 1             # CPU, about 5 minutes
  python bench.py play --preset tiny                                        # Genie play steps/s
  python bench.py memory --model dit --gpu_memory 40                        # no GPU needed, seconds
  python bench.py data videos/coinrun_wide_latents --model dit              # will the loader keep a GPU busy?
  python bench.py footage results/atari_720p60.mp4                          # 120 s of Atari play, 1280x720, 60 fps
  python bench.py prepare results/atari_720p60.mp4                          # prepare against ffmpeg's own fps+scale

train: one training step as train_loop runs it (step.train_step: bf16 autocast on CUDA, fp32 on CPU; loss,
backward, gradient clipping, the finite check, fused AdamW) on random inputs of the model's training shape. Reports
the step time, samples/s, tokens/s and the model FLOPs utilisation: mfu = FLOPs per step / step time / peak FLOP/s.
The FLOPs per step are those of the forward and backward pass, counted by torch.utils.flop_counter on the real model
at that config (matmuls, convolutions and attention, causal attention counted as full; the optimiser and elementwise
work are not counted); the peak is --peak_tflops, or the bf16 dense peak of an A100 (312 TFLOP/s) or H100 SXM
(989 TFLOP/s) when the device is one; on other devices mfu is left out. On CUDA it also counts the host syncs of one
step (`host_syncs_per_step`, the operations torch's sync debug mode flags; the design is 0).
The DiT is timed without self-forcing (its extra no-gradient forward runs on a random quarter of the clips).

generate: frames/s of the DiT's autoregressive generation at --steps Euler steps per frame with a context of
seq_len - 1 frames, with the key/value cache (each Euler step runs the new frame's 220 tokens) and without it
(every Euler step recomputes the whole window, as the seed did), on the same randomly initialised model (speed does not
depend on the weights); `decoded_fps` is the cached one with the ViT-VAE's decode to 320x180 uint8 pixels on the host
included, as generate.py runs (the VAE at the tiny preset for the tiny DiT, else the default). The context's prefill
and one warm-up frame are excluded.

play: steps/s of a world as play.py steps it (batch 1). --world genie (play.GenieWorld): MaskGIT decoding of the next
16x16 token frame in --maskgit_steps steps with the cached context, each step run twice under guidance (--cfg_scale,
as play.py; 1 runs it once), then the tokenizer's decode to 64x64 pixels.
--world diffusion (play.DiffusionWorld, a DiT taking 8 latent actions): --euler_steps cached Euler steps of the new
frame, then the ViT-VAE's decode to 320x180 pixels.

memory: the estimated peak GPU memory of one training step at the preset and batch (memory.py: the real step on
fake tensors, bf16 as on CUDA), broken into weights, gradients, AdamW moments, EMA and activations, and the
micro-batch and activation checkpointing that train_loop would choose on a card of --gpu_memory GB.

data: samples/s of the training loader (training.batches, --num_workers processes) reading DATA on this machine, next
to the samples/s one training step at the preset consumes on a GPU, its time estimated as the step's counted FLOPs
(forward and backward, as for train) / (--gpu_tflops x --mfu). A loader below the step's rate starves the GPU.

prepare: output frames/s of `dataset.py prepare` (decode, resample to --fps, resize, into a store) and of the bundled
ffmpeg's own `fps,scale` writing the same raw frames to the same disk, alternated on the same file; the ratio; the
peak RSS of the prepare command (its largest process); and the time 4.5 h of such footage would take.
footage: a video to measure prepare on without downloading one: an Atari game at 60 Hz with held random actions,
scaled up and pillarboxed to --size, H.264 with an AAC track.

gather: make gpu-check's last step: the figures of its tests and benchmarks (FOLDER/*.json) in one JSON file, with
the tests that failed or were skipped (FOLDER/tests.xml, pytest's report) and the benchmarks that wrote no figures;
exit code 1 when there is any.
cuda: the GPU torch sees, its memory, the NVIDIA driver and the CUDA version torch was built for; when torch sees no
GPU, one line that says why it may not (a wheel built for a newer CUDA than the driver's) and exit code 2.

--profile prints torch.profiler's table of one more step or frame: what limits the figure.
--compile: train compiles the model's blocks as train_loop does (the default on CUDA, --no-compile to time eager);
generate and play compile the per-step calls as generate.py and play.py do with --compile (CUDA graphs on CUDA).

Every figure is the median over --runs runs, after warm-up steps that are not timed.
"""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from xml.etree import ElementTree

import cv2
import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import flop_counter

import dit
import dynamics
import lam
import memory
import train_dit
import train_genie
import train_vae
import vae
import vae2
from dataset import LatentStore, WindowDataset, ffmpeg_exe, open_store, prepare, probe
from generate import compile_world, decode_frame
from play import EULER_STEPS, DiffusionWorld, GenieWorld
from step import checkpoint_blocks, make_optimizer, train_step
from training import DEFAULT_WORKERS, add_compile_flag, batches, compile_blocks, use_compile
from utils import TrainingFailed, UserError, add_precision_flag, add_step_compile_flag, atomic_write_text, \
    autocast, first_line, get_device, nvidia_driver, parse_size, positive, run_cli

# bf16 dense peaks in TFLOP/s, by a part of the CUDA device name (the first match wins)
PEAK_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "A100": 312}
MODELS = ["dit", "vae2", "tokenizer", "lam", "dynamics"]

# torch's FLOP counter knows the CUDA attention kernels but not the CPU one: count it the same way (causal attention
# is counted as full, as for CUDA), so that CPU and GPU figures mean the same thing.
_cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _cpu_attention not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(_cpu_attention)(
        lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v))
    flop_counter.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)(
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(grad, q, k, v))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def print_profile(work, device, rows=15):
    """Run work() once under torch.profiler and print the operations that took the most time (on the GPU when there
    is one), to see what limits a figure: many short kernels (launch overhead), attention, matmuls, copies."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        work()
        synchronize(device)
    print(profile.key_averages().table(sort_by=f"self_{'cuda' if device.type == 'cuda' else 'cpu'}_time_total",
                                       row_limit=rows))
    events = profile.events()
    if device.type == "cuda":
        kernels = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)
        print(f"{kernels} GPU kernels and copies")
    else:  # in eager mode on a GPU, each would launch a kernel
        leaves = sum(e.name.startswith("aten::") and not e.cpu_children and computes(e.name) for e in events)
        print(f"{leaves} operations at the leaves of the call tree (views and allocations not counted)")


def computes(name):
    """Whether the aten operation `name` does work on the data: not a view, not an allocation."""
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    return name not in ("aten::empty", "aten::empty_strided") and not (
        packet is not None and any(getattr(packet, overload).is_view for overload in packet.overloads()))


def frames_per_second(model, context, frames, steps, cached, runs, device, vae=None):
    """Median frames/s over `runs` runs of `frames` frames each, after one untimed frame per run. With a VAE, each
    frame is also decoded to uint8 pixels on the host, as generate.py does."""
    rates, sampler = [], dit.Sampler(model, steps, cached=cached)
    for _ in range(runs):
        sampler.start(context)
        sampler.next_frame()  # a warm-up frame
        synchronize(device)
        started = time.perf_counter()
        for _ in range(frames):
            latents = sampler.next_frame()
            if vae is not None:
                decode_frame(vae, model, latents)
        synchronize(device)
        rates.append(frames / (time.perf_counter() - started))
    return statistics.median(rates)


def bench_generate(args, device):
    config = dit.PRESETS[args.preset]
    model = dit.DiT(config).to(device).eval()
    vae = vae2.ViTVAE(vae2.PRESETS["tiny" if args.preset == "tiny" else "default"]).to(device).eval()
    if args.compile:
        compile_world(vae, model, device)
    context = torch.randn(1, config.seq_len - 1, config.rows * config.cols, config.latent_dim, device=device)
    result = {"preset": args.preset, "device": str(device), "compile": args.compile,
              "params": sum(p.numel() for p in model.parameters()), "seq_len": config.seq_len, "steps": args.steps,
              "frames": args.frames, "runs": args.runs}
    with torch.no_grad(), autocast(device):
        for cached in (True, False):
            key = "cached_fps" if cached else "uncached_fps"
            result[key] = frames_per_second(model, context, args.frames, args.steps, cached, args.runs, device)
        result["decoded_fps"] = frames_per_second(model, context, args.frames, args.steps, True, args.runs, device, vae)
    result["speedup"] = result["cached_fps"] / result["uncached_fps"]
    print(f"DiT {args.preset} ({result['params'] / 1e6:.1f}M parameters) on {device}, T = {config.seq_len}, "
          f"{args.steps} Euler steps per frame, batch 1")
    print(f"  {'':10s} {'frames/s':>10s} {'ms/frame':>10s}")
    for name in ("cached", "uncached", "decoded"):
        fps = result[f"{name}_fps"]
        print(f"  {name:10s} {fps:10.3f} {1000 / fps:10.1f}")
    print(f"  cached / uncached = {result['speedup']:.1f}x")
    if args.profile:
        print("profile of one decoded frame, cached:")
        with torch.no_grad(), autocast(device):
            sampler = dit.Sampler(model, args.steps).start(context)
            sampler.next_frame()
            print_profile(lambda: decode_frame(vae, model, sampler.next_frame()), device)
    return result


def training_defaults(args):
    """-> (the training script's hyperparameters at args.preset, the batch size: args.batch_size or the preset's)."""
    defaults = {"vae2": train_vae.DEFAULTS, "dit": train_dit.DEFAULTS}.get(args.model, train_genie.DEFAULTS)
    if args.preset not in defaults:
        raise UserError(f"{args.model} has no preset {args.preset!r}; presets: {', '.join(defaults)}")
    return defaults[args.preset], args.batch_size or defaults[args.preset]["batch_size"]


def training_inputs(name, preset, batch_size, device):
    """A model at the preset and random inputs of its training shape: (model, batch, tokens per sample), the batch a
    dict of the forward's arguments in order (see `forward`)."""
    b = batch_size
    if name == "vae2":
        c = vae2.PRESETS[preset]
        return vae2.ViTVAE(c), {"frames": torch.rand(b, 1, 3, c.height, c.width, device=device) * 2 - 1}, c.tokens
    if name == "dit":
        c = dit.PRESETS[preset]
        tokens = c.rows * c.cols
        latents = torch.randn(b, c.seq_len, tokens, c.latent_dim, device=device)
        return dit.DiT(c), {"latents": latents}, c.seq_len * tokens
    if name == "tokenizer":
        c = vae.PRESETS[preset]
        frames = torch.rand(b, 3, c.image_size, c.image_size, device=device) * 2 - 1
        return vae.Tokenizer(c), {"frames": frames}, c.grid ** 2
    if name == "lam":
        c, t = lam.PRESETS[preset], train_genie.DEFAULTS[preset]["lam_seq_len"]
        frames = torch.rand(b, t, 3, c.image_size, c.image_size, device=device) * 2 - 1
        return lam.LatentActionModel(c), {"frames": frames}, t * c.grid[0] * c.grid[1]
    c = dynamics.PRESETS[preset]
    tokens = torch.randint(c.vocab_size, (b, c.context, c.rows, c.cols), device=device)
    actions = torch.randint(c.num_actions, (b, c.context - 1), device=device)
    return dynamics.Dynamics(c), {"tokens": tokens, "actions": actions}, c.context * c.rows * c.cols


def forward(net, batch, step):
    """The loss of a training_inputs batch, as train_loop's loss_fn."""
    return net(*batch.values())


def peak_tflops(args, device):
    if args.peak_tflops:
        return args.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def bench_train(args, device):
    _, batch_size = training_defaults(args)
    micro_batch, checkpoint = args.micro_batch or batch_size, args.checkpoint_blocks
    if batch_size % micro_batch:
        raise UserError(f"--micro_batch {micro_batch} must divide the batch of {batch_size}")
    if device.type == "cuda" and not args.micro_batch:  # as train_loop plans it
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        found = memory.plan(lambda m: training_inputs(args.model, args.preset, m, None)[:2], forward, batch_size,
                            memory.budget(total, free), checkpoint=checkpoint or None, device="cuda")
        micro_batch, checkpoint = found["micro_batch"], found["checkpoint_blocks"]
    model, batch, tokens = training_inputs(args.model, args.preset, batch_size, device)
    model = model.to(device).train()
    if checkpoint:
        checkpoint_blocks(model)
    compiled = use_compile(args, device)
    if compiled:
        compile_blocks(model)
    optimizer = make_optimizer(model, 1e-4)

    def step():  # train_loop's step, without the data loader and the logging
        train_step(model, model, optimizer, forward, batch, 0, device, micro_batches=batch_size // micro_batch)

    for _ in range(args.warmup):
        step()
    syncs = host_syncs(step) if device.type == "cuda" else None
    with flop_counter.FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    times = []
    for _ in range(args.runs):
        synchronize(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize(device)
        times.append((time.perf_counter() - started) / args.steps)
    seconds = statistics.median(times)
    peak = peak_tflops(args, device)
    result = {"model": args.model, "preset": args.preset, "device": str(device), "compile": compiled,
              "micro_batch": micro_batch, "checkpoint_blocks": checkpoint, "params": sum(p.numel() for p in model.parameters()), "batch_size": batch_size,
              "step_ms": 1000 * seconds, "samples_per_s": batch_size / seconds,
              "tokens_per_s": batch_size * tokens / seconds, "flops_per_step": flops,
              "achieved_tflops": flops / seconds / 1e12, "peak_tflops": peak,
              "mfu": flops / seconds / (peak * 1e12) if peak else None, "host_syncs_per_step": syncs}
    print(f"train {args.model} {args.preset} ({result['params'] / 1e6:.1f}M parameters) on {device}, batch "
          f"{batch_size} in micro-batches of {micro_batch}{', compiled' if compiled else ''}"
          f"{', activation checkpointing' if checkpoint else ''}")
    print(f"  step {result['step_ms']:.1f} ms, {result['samples_per_s']:.1f} samples/s, "
          f"{result['tokens_per_s']:.0f} tokens/s, {flops / 1e9:.1f} GFLOP per step (forward + backward), "
          f"{result['achieved_tflops']:.3f} TFLOP/s, MFU "
          + (f"{100 * result['mfu']:.1f} % of {peak} TFLOP/s" if peak else "n/a (no known peak: --peak_tflops)")
          + (f", {syncs} host syncs per step" if syncs is not None else ""))
    if args.profile:
        print("profile of one training step:")
        print_profile(step, device)
    return result


def host_syncs(step):
    """How many times one CUDA training step makes the host wait for the GPU, by torch's sync debug mode."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def bench_memory(args, device):
    _, batch_size = training_defaults(args)
    if args.micro_batch and batch_size % args.micro_batch:
        raise UserError(f"--micro_batch {args.micro_batch} must divide --batch_size {batch_size}")

    budget = memory.budget(args.gpu_memory * memory.GB)
    found = memory.plan(lambda m: training_inputs(args.model, args.preset, m, "cpu")[:2], forward, batch_size, budget,
                        args.micro_batch, args.checkpoint_blocks, ema=args.model == "dit")
    parts = {k: v / memory.GB for k, v in found["estimate"].items()}
    result = {"model": args.model, "preset": args.preset, "batch_size": batch_size, "gpu_memory_gb": args.gpu_memory,
              "budget_gb": budget / memory.GB, "fits": found["fits"], "micro_batch": found["micro_batch"],
              "checkpoint_blocks": found["checkpoint_blocks"], "peak_gb": parts.pop("peak"),
              **{f"{k}_gb": v for k, v in parts.items()}}
    print(f"train {args.model} {args.preset}, batch {batch_size} on a {args.gpu_memory:g} GB GPU (plans fill at most "
          f"{result['budget_gb']:.1f} GB): micro-batch {result['micro_batch']}, activation checkpointing "
          f"{'on' if result['checkpoint_blocks'] else 'off'}, estimated peak {result['peak_gb']:.2f} GB"
          + ("" if result["fits"] else " -- does NOT fit"))
    for key in ("weights", "gradients", "optimizer", "ema", "activations"):
        print(f"  {key:12s} {result[key + '_gb']:8.2f} GB")
    return result


def step_flops(name, preset, batch_size):
    """FLOPs of one training step's forward and backward at the preset, counted on fake tensors (no compute)."""
    with FakeTensorMode(), flop_counter.FlopCounterMode(display=False) as counter:
        model, batch, _ = training_inputs(name, preset, batch_size, "cpu")
        loss, _ = forward(model, batch, 0)
        loss.backward()
    return counter.get_total_flops()


def bench_data(args, device):
    """Samples/s of the training loader (training.batches, as train_loop runs it) against the samples/s a GPU step
    consumes, its time estimated from the step's FLOPs at --gpu_tflops and --mfu."""
    defaults, batch_size = training_defaults(args)
    store = open_store(args.data)
    if (args.model == "dit") != isinstance(store, LatentStore):
        raise UserError(f"{args.data}: the {args.model} trains on a {'latent' if args.model == 'dit' else 'frame'} "
                        f"store")
    frames = {"dit": lambda: dit.PRESETS[args.preset].seq_len, "lam": lambda: defaults["lam_seq_len"],
              "dynamics": lambda: dynamics.PRESETS[args.preset].context}.get(args.model, lambda: 1)()
    dataset = WindowDataset(store, frames)
    if len(dataset) < batch_size:
        raise UserError(f"{args.data} has {len(dataset)} training windows of {frames} frames, fewer than a batch")
    loader = batches(dataset, argparse.Namespace(batch_size=batch_size, seed=0, num_workers=args.num_workers),
                     torch.device("cpu"), 0, 0, 1)
    for _ in range(args.warmup):
        next(loader)
    started = time.perf_counter()
    for _ in range(args.steps):
        next(loader)
    loader_rate = args.steps * batch_size / (time.perf_counter() - started)
    loader.close()
    flops = step_flops(args.model, args.preset, batch_size)
    step_seconds = flops / (args.gpu_tflops * 1e12 * args.mfu)
    result = {"model": args.model, "preset": args.preset, "data": str(args.data), "batch_size": batch_size,
              "frames_per_sample": frames, "num_workers": args.num_workers, "loader_samples_per_s": loader_rate,
              "flops_per_step": flops, "gpu_tflops": args.gpu_tflops, "mfu": args.mfu,
              "gpu_step_ms": 1000 * step_seconds, "gpu_samples_per_s": batch_size / step_seconds}
    result["loader_ratio"] = loader_rate / result["gpu_samples_per_s"]
    print(f"data {args.model} {args.preset} from {args.data}: batch {batch_size} of {frames} frame(s), "
          f"{args.num_workers} workers")
    print(f"  loader    {loader_rate:10.1f} samples/s on this machine")
    print(f"  GPU step  {result['gpu_samples_per_s']:10.1f} samples/s ({flops / 1e12:.2f} TFLOP per step at "
          f"{args.gpu_tflops:g} TFLOP/s x MFU {args.mfu:g}: {result['gpu_step_ms']:.1f} ms)")
    print(f"  the loader keeps up with {100 * result['loader_ratio']:.0f} % of that step rate"
          + ("" if result["loader_ratio"] >= 1 else ": it would starve the GPU (more --num_workers?)"))
    return result


def bench_play(args, device):
    if args.world == "genie":
        tokenizer = vae.Tokenizer(vae.PRESETS[args.preset]).to(device).eval()
        grid = tokenizer.config.grid
        config = dataclasses.replace(dynamics.PRESETS[args.preset], vocab_size=tokenizer.config.num_codes, rows=grid,
                                     cols=grid)
        world = GenieWorld(tokenizer, dynamics.Dynamics(config).to(device).eval(), args.maskgit_steps,
                           cfg_scale=args.cfg_scale)
        how = f"{args.maskgit_steps} MaskGIT steps, guidance {args.cfg_scale:g}, context {config.context}"
        settings = {"maskgit_steps": args.maskgit_steps, "cfg_scale": args.cfg_scale, "context": config.context}
    else:
        config = dataclasses.replace(dit.PRESETS[args.preset], num_actions=8)
        autoencoder = vae2.ViTVAE(vae2.PRESETS[args.preset]).to(device).eval()
        world = DiffusionWorld(autoencoder, dit.DiT(config).to(device).eval(), args.euler_steps)
        how = f"{args.euler_steps} Euler steps, context {config.seq_len - 1}"
        settings = {"euler_steps": args.euler_steps, "context": config.seq_len - 1}
    model = world.dynamics if args.world == "genie" else world.model
    if args.compile:
        world.compile()
    rates = []
    for run in range(args.runs):
        world.reset(np.zeros((1, *world.frame_size, 3), np.uint8))
        for _ in range(args.warmup):
            world.step([run % world.num_actions])
        started = time.perf_counter()
        for k in range(args.steps):
            world.step([k % world.num_actions])  # returns uint8 pixels: the host copy synchronises
        rates.append(args.steps / (time.perf_counter() - started))
    result = {"world": args.world, "preset": args.preset, "device": str(device), "compile": args.compile, **settings,
              "params": sum(p.numel() for p in model.parameters()), "steps_per_s": statistics.median(rates)}
    print(f"play {args.world} {args.preset} on {device}: {result['steps_per_s']:.1f} steps/s "
          f"({1000 / result['steps_per_s']:.1f} ms per step, {how}, batch 1, decode included)")
    if args.profile:
        print("profile of one play step:")
        print_profile(lambda: world.step([0]), device)
    return result


# ----------------------------------------------------------------------------- footage

def encode_video(path, frames, size, fps, audio=False, times=None):
    """Encode uint8 RGB frames (an iterable of (H, W, 3)) as H.264 in an mp4 the way footage arrives: yuv420p, the
    index first (as YouTube serves it), an AAC tone as a second track with `audio`, and, when `times` (an ffmpeg
    expression of the frame number N, in seconds) is given, variable frame timing instead of N / fps."""
    width, height = size
    command = [ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{width}x{height}", "-r", str(fps), "-i", "-"]
    if audio:
        command += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000", "-shortest", "-c:a", "aac"]
    if times:
        command += ["-vf", f"settb=1/90000,setpts='({times})/TB'", "-fps_mode", "passthrough", "-enc_time_base",
                    "1/90000"]
    command += ["-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p", "-movflags",
                "+faststart", str(path)]
    encoder = subprocess.Popen(command, stdin=subprocess.PIPE)
    for frame in frames:
        encoder.stdin.write(np.ascontiguousarray(frame, np.uint8).tobytes())
    encoder.stdin.close()
    if encoder.wait() != 0:
        raise UserError(f"ffmpeg could not write {path}")


def atari_footage(game, size, fps, seconds, seed=0):
    """Frames of an Atari game played at its native 60 Hz by held random actions, scaled up (nearest, as emulator
    captures are) to the height of `size` and centred between black pillarbox bars: what an Atari upload looks
    like."""
    import ale_py
    from ale_py.vector_env import AtariVectorEnv
    if game not in ale_py.roms.get_all_rom_ids():
        raise UserError(f"unknown ALE game {game!r}")
    width, height = size
    env = AtariVectorEnv(game, 1, img_height=210, img_width=160, grayscale=False, stack_num=1, frameskip=1,
                         repeat_action_probability=0.0)
    env.reset(seed=seed)
    rng, action, hold = np.random.default_rng(seed), 0, 0
    inner = min(width, round(160 / 210 * height))
    canvas = np.zeros((height, width, 3), np.uint8)
    for _ in range(round(seconds * fps)):
        if hold <= 0:
            action, hold = rng.integers(env.single_action_space.n), rng.integers(1, 30)
        hold -= 1
        observation, *_ = env.step(np.array([action]))
        left = (width - inner) // 2
        canvas[:, left:left + inner] = cv2.resize(observation[0, 0], (inner, height), interpolation=cv2.INTER_NEAREST)
        yield canvas
    env.close()


def bench_footage(args, device):
    size = parse_size(args.size)
    started = time.perf_counter()
    encode_video(args.out, atari_footage(args.game, size, args.fps, args.seconds), size, args.fps, audio=True)
    print(f"wrote {args.out}: {args.seconds:g} s of {args.game} at {size[0]}x{size[1]}, {args.fps:g} fps, H.264 with "
          f"an AAC track ({Path(args.out).stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - started:.0f} s)")
    return {"video": args.out, "game": args.game, "size": args.size, "fps": args.fps, "seconds": args.seconds}


def bench_prepare(args, device):
    """Output frames/s of dataset.prepare and of ffmpeg's own fps + scale (the decoder it sits on, writing the same
    raw frames to the same disk), alternated on the same file; and the peak RSS of the prepare command."""
    size = parse_size(args.size)
    info = probe(Path(args.video))
    baseline = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", args.video, "-map",
                "0:v:0", "-vf", f"fps={args.fps:g},scale={size[0]}:{size[1]}:flags=area", "-pix_fmt", "rgb24",
                "-f", "rawvideo"]
    times = {"prepare": [], "ffmpeg": []}
    with tempfile.TemporaryDirectory(dir=Path(args.video).parent) as scratch:
        for _ in range(args.runs):
            started = time.perf_counter()
            subprocess.run(baseline + [f"{scratch}/raw"], check=True)
            times["ffmpeg"].append(time.perf_counter() - started)
            started = time.perf_counter()
            count = prepare(args.video, f"{scratch}/store", args.fps, size).count
            times["prepare"].append(time.perf_counter() - started)
        if (Path(scratch) / "raw").stat().st_size != count * size[0] * size[1] * 3:
            raise UserError("prepare and ffmpeg's fps filter made different numbers of frames")
        command = [sys.executable, "dataset.py", "prepare", args.video, "--fps", f"{args.fps:g}", "--size", args.size,
                   "--out", f"{scratch}/rss"]
        process = subprocess.Popen(command, cwd=Path(__file__).parent, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        peak_rss_mb = os.wait4(process.pid, 0)[2].ru_maxrss / 1024  # the largest of it and its ffmpeg
    rates = {k: count / statistics.median(v) for k, v in times.items()}
    result = {"video": args.video, "source": info, "fps": args.fps, "size": args.size, "frames": count,
              "prepare_frames_per_s": rates["prepare"], "ffmpeg_frames_per_s": rates["ffmpeg"],
              "ratio": rates["prepare"] / rates["ffmpeg"], "peak_rss_mb": peak_rss_mb,
              "seconds_per_footage_second": count / rates["prepare"] / info["duration"]}
    print(f"prepare {args.video} ({info['width']}x{info['height']}, {info['fps']:g} fps, {info['duration']:.1f} s) to "
          f"{args.fps:g} fps {args.size}: {count} frames, median of {args.runs} runs")
    print(f"  prepare  {rates['prepare']:8.1f} output frames/s")
    print(f"  ffmpeg   {rates['ffmpeg']:8.1f} output frames/s (fps={args.fps:g},scale={size[0]}:{size[1]}:flags=area)")
    print(f"  ratio    {result['ratio']:8.3f}; peak RSS of the prepare command {peak_rss_mb:.0f} MB; 4.5 h of such "
          f"footage: about {4.5 * 60 * result['seconds_per_footage_second']:.1f} min")
    return result


def bench_cuda(args, device):
    """The GPU as torch sees it (get_device has refused a machine where it sees none)."""
    properties = torch.cuda.get_device_properties(device)
    result = {"gpu": properties.name, "memory_gb": properties.total_memory / 1e9, "gpus": torch.cuda.device_count(),
              "capability": f"{properties.major}.{properties.minor}", "torch": torch.__version__,
              "torch_cuda": torch.version.cuda, "driver": nvidia_driver(), "bf16": torch.cuda.is_bf16_supported()}
    print(f"{result['gpu']} ({result['memory_gb']:.0f} GB, compute capability {result['capability']}, "
          f"{result['gpus']} visible); torch {result['torch']} built for CUDA {result['torch_cuda']}; {result['driver']}")
    return result


GPU_CHECK_BENCHMARKS = ["cuda", *(f"train_{m}" for m in MODELS), "generate", "generate_compiled", "play",
                        "play_compiled"]  # the figures make gpu-check's benchmarks write


def bench_gather(args, device):
    folder = Path(args.folder)
    figures = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    failures = [f"bench.py: no {name}.json" for name in GPU_CHECK_BENCHMARKS if name not in figures]
    report = folder / "tests.xml"
    if not report.is_file():
        failures.append("tests/test_gpu.py: no report (pytest did not run)")
    else:
        for case in ElementTree.parse(report).iter("testcase"):
            for outcome in ("failure", "error", "skipped"):
                for found in case.findall(outcome):
                    failures.append(f"{case.get('name')}: {outcome}: {first_line(found.get('message') or '')[:300]}")
    atomic_write_text(args.json, json.dumps({**figures, "failures": failures}, indent=1))
    print(f"wrote {args.json}: {len(figures)} sets of figures, {len(failures)} failures"
          + "".join(f"\n  {f}" for f in failures))
    args.json = None  # written here, with the failures
    if failures:
        raise TrainingFailed(f"make gpu-check: {len(failures)} of its checks failed or did not run (listed above)")
    return figures


def main():
    parser = argparse.ArgumentParser(description="Benchmark the models: prints a table, writes JSON with --json.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("cuda", help="the GPU torch sees, its driver and torch's CUDA version; exit code 2 when it sees none")
    p = sub.add_parser("gather", help="make gpu-check's figures and failures in one JSON file (--json)")
    p.add_argument("folder", help="the folder of figures (results/gpu_check)")
    p = sub.add_parser("train", help="training step time, samples/s, tokens/s and MFU of one model")
    p.add_argument("--model", default="dit", choices=MODELS, help="which model (default dit)")
    p.add_argument("--preset", default="tiny", help="model size: tiny or default (small too for the DiT)")
    p.add_argument("--batch_size", type=positive(int), help="default: the training script's for that preset")
    p.add_argument("--steps", type=positive(int), default=5, help="timed steps per run (default 5)")
    p.add_argument("--warmup", type=positive(int), default=2, help="untimed steps first (default 2)")
    p.add_argument("--runs", type=positive(int), default=3, help="runs; the median is reported (default 3)")
    add_compile_flag(p)
    p.add_argument("--micro_batch", type=positive(int),
                   help="samples per forward and backward (default: on CUDA planned as train_loop does, by memory.py "
                        "from the GPU's free memory; elsewhere the whole batch)")
    p.add_argument("--checkpoint_blocks", action="store_true",
                   help="activation checkpointing per block (default: on CUDA as planned, elsewhere off); its "
                        "recompute is counted in the FLOPs and so in the MFU")
    p.add_argument("--peak_tflops", type=positive(float), help="the device's peak, for MFU (A100/H100 known)")
    p = sub.add_parser("memory", help="estimated peak GPU memory of one training step (no GPU needed) and the "
                                      "micro-batch and activation checkpointing that fit a card")
    p.add_argument("--model", default="dit", choices=MODELS, help="which model (default dit)")
    p.add_argument("--preset", default="default", help="model size (default: default)")
    p.add_argument("--batch_size", type=positive(int), help="default: the training script's for that preset")
    p.add_argument("--gpu_memory", type=positive(float), default=80, metavar="GB", help="the card (default 80)")
    p.add_argument("--micro_batch", type=positive(int), help="fix the micro-batch (default: planned)")
    p.add_argument("--checkpoint_blocks", action=argparse.BooleanOptionalAction,
                   help="fix activation checkpointing on or off (default: planned)")
    p = sub.add_parser("data", help="the training loader's samples/s against what a GPU step consumes")
    p.add_argument("data", help="the store the model trains on (a latent store for the DiT, else a frame store)")
    p.add_argument("--model", default="dit", choices=MODELS, help="which model (default dit)")
    p.add_argument("--preset", default="default", help="model size (default: default)")
    p.add_argument("--batch_size", type=positive(int), help="default: the training script's for that preset")
    p.add_argument("--num_workers", type=int, default=DEFAULT_WORKERS,
                   help=f"DataLoader worker processes (default {DEFAULT_WORKERS}, as training here)")
    p.add_argument("--steps", type=positive(int), default=20, help="timed batches (default 20)")
    p.add_argument("--warmup", type=positive(int), default=3, help="untimed batches first (default 3)")
    p.add_argument("--gpu_tflops", type=positive(float), default=989,
                   help="the GPU's bf16 dense peak in TFLOP/s (default 989, an H100 SXM)")
    p.add_argument("--mfu", type=positive(float), default=0.4, help="the share of it a step reaches (default 0.4)")
    p = sub.add_parser("play", help="play steps/s of a Genie or diffusion world (the next frame + pixel decode)")
    p.add_argument("--world", default="genie", choices=["genie", "diffusion"], help="which world (default genie)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "default"], help="model sizes (default tiny)")
    p.add_argument("--maskgit_steps", type=positive(int), default=8, help="genie: decoding steps per frame (default 8)")
    p.add_argument("--cfg_scale", type=positive(float), default=dynamics.CFG_SCALE,
                   help=f"genie: guidance of the action, 1 = none, one pass per step (default {dynamics.CFG_SCALE:g})")
    p.add_argument("--euler_steps", type=positive(int), default=EULER_STEPS,
                   help=f"diffusion: Euler steps per frame (default {EULER_STEPS}, as play.py)")
    p.add_argument("--steps", type=positive(int), default=20, help="timed play steps per run (default 20)")
    p.add_argument("--warmup", type=positive(int), default=3, help="untimed steps first (default 3)")
    p.add_argument("--runs", type=positive(int), default=3, help="runs; the median is reported (default 3)")
    add_step_compile_flag(p)
    p = sub.add_parser("generate", help="DiT generation frames/s with and without the key/value cache")
    p.add_argument("--preset", default="tiny", choices=list(dit.PRESETS), help="DiT size (default tiny)")
    p.add_argument("--steps", type=positive(int), default=10, help="Euler steps per frame (default 10)")
    p.add_argument("--frames", type=positive(int), default=4, help="timed frames per run (default 4)")
    p.add_argument("--runs", type=positive(int), default=3, help="runs; the median is reported (default 3)")
    add_step_compile_flag(p)
    p = sub.add_parser("prepare", help="dataset.py prepare's output frames/s next to ffmpeg's own fps + scale")
    p.add_argument("video", help="a video file (make one with `bench.py footage`)")
    p.add_argument("--fps", type=positive(float), default=12.0, help="frames per second of the store (default 12)")
    p.add_argument("--size", default="320x180", help="WIDTHxHEIGHT of the stored frames (default 320x180)")
    p.add_argument("--runs", type=positive(int), default=3, help="runs of each; the median is reported (default 3)")
    p = sub.add_parser("footage", help="write a video of Atari play to benchmark prepare on (no download needed)")
    p.add_argument("out", help="the mp4 to write")
    p.add_argument("--game", default="breakout", help="an ALE game (default breakout)")
    p.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT (default 1280x720)")
    p.add_argument("--fps", type=positive(float), default=60.0, help="frames per second (default 60)")
    p.add_argument("--seconds", type=positive(float), default=120.0, help="length (default 120)")
    for p in sub.choices.values():
        p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
        add_precision_flag(p)
        p.add_argument("--profile", action="store_true",
                       help="also print torch.profiler's table of the slowest operations of one step or frame")
        p.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.command == "gather":
        if not args.json:
            raise UserError("gather: --json FILE is where the figures go")
        return bench_gather(args, None)
    device = get_device("cuda" if args.command == "cuda" else args.device, precision=args.precision)
    torch.manual_seed(0)
    result = {"cuda": bench_cuda, "train": bench_train, "play": bench_play, "generate": bench_generate, "memory": bench_memory,
              "data": bench_data, "prepare": bench_prepare, "footage": bench_footage}[args.command](args, device)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run_cli(main)
