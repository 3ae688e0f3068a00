"""Train a latent action model (lam.py) on footage for the diffusion pipeline: one discrete action per transition,
learned from the ViT-VAE's latent frames of unlabelled video.

  python train_lam.py videos/coinrun_wide_latents --vae models/vae2 --preset tiny     # CPU, minutes
  python train_lam.py videos/z8r255LoVJc_12fps_320x180 --vae models/vae2              # one GPU, default sizes

DATA is a latent store that `dataset.py encode` made with that VAE, or a frame store or video, encoded once into
<store>_latents beside it (as for train_dit.py). The LAM is lam.py's with input=latents: it reads each frame's 11 x 20
latents of 48 numbers (the conv LAM as a 48-channel image), posterior draws scaled to unit variance as the DiT sees
them, in clips of --seq_len frames of the training split.

Writes the model folder --out (config.json + model.safetensors) and its loss log to logs/<name>.json beside it.
Kill it at any time (Ctrl-C and SIGTERM save a training state first): rerunning the same command continues from the
last state in checkpoints/ beside --out and ends with the same weights as an uninterrupted run (see training.py).
"""
import argparse
import dataclasses
from pathlib import Path

import lam
from dataset import WindowDataset, open_latents
from train_dit import sample_latents
from training import add_training_flags, rank_zero_first, train_loop
from utils import add_config_flags, apply_defaults, build, get_device, load_model, override, positive, run_cli, \
    seed_everything
from vae2 import ViTVAE

DEFAULTS = {  # training hyperparameters per preset; tiny: 2,400 steps of the conv LAM on 11x20 latents take about 2 min
    "tiny": dict(steps=2400, batch_size=16, lr=1e-3, seq_len=4),
    "default": dict(steps=50_000, batch_size=64, lr=3e-4, seq_len=16),
}


def main():
    parser = argparse.ArgumentParser(description="Train a latent action model on the ViT-VAE's latents of footage.")
    parser.add_argument("data", help="latent store, or a frame store / video of 320x180 frames (encoded once)")
    parser.add_argument("--vae", default="models/vae2", help="the trained ViT-VAE folder (default models/vae2)")
    parser.add_argument("--out", default="models/lam",
                        help="model folder to write (default models/lam: beside vae2/ and dit/, the world that "
                             "generate.py, evaluate.py and play.py load)")
    add_config_flags(parser, lam.PRESETS, "LAM (tiny: CPU, tests; default: a GPU)")
    parser.add_argument("--seq_len", type=positive(int), help="frames per training clip (tiny 4, default 16)")
    parser.add_argument("--steps", type=positive(int), help="training steps (tiny 2400, default 50000)")
    parser.add_argument("--batch_size", type=positive(int), help="clips per step (tiny 16, default 64)")
    parser.add_argument("--lr", type=positive(float), help="peak learning rate (tiny 1e-3, default 3e-4)")
    add_training_flags(parser)
    args = parser.parse_args()
    apply_defaults(args, DEFAULTS[args.preset])
    device = get_device(args.device, args.deterministic, args.precision)

    latents = rank_zero_first(lambda: open_latents(args.data, args.vae, device))
    vae_config = load_model(ViTVAE, args.vae).config
    # the tokens are the VAE's latents, whatever --set says of the input
    config = dataclasses.replace(override(lam.PRESETS[args.preset], args.set), input="latents", rows=vae_config.rows,
                                 cols=vae_config.cols, latent_dim=vae_config.latent_dim)
    dataset = WindowDataset(latents, args.seq_len)
    seed_everything(args.seed)
    model = build(lam.LatentActionModel, config).to(device)
    print(f"lam: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(dataset)} training clips "
          f"of {args.seq_len} latent frames of {latents.path}")
    out = Path(args.out)
    train_loop(model, lambda net, batch, step: net(sample_latents(batch, latents.scale)), dataset, args, device, out,
               out.parent / "logs" / f"{out.name}.json", name=out.name, project="gameworld-lam",
               unchanged={"data", "out", "vae", "set"})
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
