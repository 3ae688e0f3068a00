"""Speed measurements: a table on stdout and the figures as JSON. Timed tests do not exist; speed lives here.

  python bench.py generate --preset tiny                                    # CPU, seconds
  python bench.py generate --preset default --frames 1 --runs 1             # CPU, about 10 minutes
  python bench.py generate --preset default --device cuda --json results/bench_generate_h100.json

generate: frames/s of the DiT's autoregressive generation at --steps Euler steps per frame with a context of
seq_len - 1 frames, with the key/value cache (each Euler step runs the new frame's 220 tokens) and without it
(every Euler step recomputes the whole window, as the seed did), on the same randomly initialised model (speed does not
depend on the weights). The time of a frame is measured in steady state: the context's prefill and one warm-up frame
are excluded, and each figure is the median over --runs runs. bf16 autocast on CUDA, fp32 on CPU.
"""
import argparse
import json
import statistics
import time

import torch

import dit
from utils import atomic_write_text, get_device, positive, run_cli


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def frames_per_second(model, context, frames, steps, cached, runs, device):
    """Median frames/s over `runs` runs of `frames` frames each, after one untimed frame per run."""
    rates = []
    for _ in range(runs):
        stream = model.stream(context, steps, cached=cached)
        next(stream)  # prefill of the cache and a warm-up frame
        synchronize(device)
        started = time.perf_counter()
        for _ in range(frames):
            next(stream)
        synchronize(device)
        rates.append(frames / (time.perf_counter() - started))
    return statistics.median(rates)


def bench_generate(args, device):
    config = dit.PRESETS[args.preset]
    model = dit.DiT(config).to(device).eval()
    context = torch.randn(1, config.seq_len - 1, config.rows * config.cols, config.latent_dim, device=device)
    result = {"preset": args.preset, "device": str(device), "params": sum(p.numel() for p in model.parameters()),
              "seq_len": config.seq_len, "steps": args.steps, "frames": args.frames, "runs": args.runs}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for cached in (True, False):
            key = "cached_fps" if cached else "uncached_fps"
            result[key] = frames_per_second(model, context, args.frames, args.steps, cached, args.runs, device)
    result["speedup"] = result["cached_fps"] / result["uncached_fps"]
    print(f"DiT {args.preset} ({result['params'] / 1e6:.1f}M parameters) on {device}, T = {config.seq_len}, "
          f"{args.steps} Euler steps per frame, batch 1")
    print(f"  {'':10s} {'frames/s':>10s} {'ms/frame':>10s}")
    for name in ("cached", "uncached"):
        fps = result[f"{name}_fps"]
        print(f"  {name:10s} {fps:10.3f} {1000 / fps:10.1f}")
    print(f"  cached / uncached = {result['speedup']:.1f}x")
    return result


def main():
    parser = argparse.ArgumentParser(description="Benchmark the models: prints a table, writes JSON with --json.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="DiT generation frames/s with and without the key/value cache")
    p.add_argument("--preset", default="tiny", choices=list(dit.PRESETS), help="DiT size (default tiny)")
    p.add_argument("--steps", type=positive(int), default=10, help="Euler steps per frame (default 10)")
    p.add_argument("--frames", type=positive(int), default=4, help="timed frames per run (default 4)")
    p.add_argument("--runs", type=positive(int), default=3, help="runs; the median is reported (default 3)")
    for p in sub.choices.values():
        p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
        p.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    device = get_device(args.device)
    torch.manual_seed(0)
    result = bench_generate(args, device)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run_cli(main)
