"""Train the ViT-VAE (vae2.py) of the latent diffusion pipeline on 320x180 frames.

  python train_vae.py videos/coinrun_wide --preset tiny                 # CPU, a few minutes
  python train_vae.py videos/z8r255LoVJc.mp4                            # one GPU, default sizes (~59M parameters)
  python train_vae.py videos/z8r255LoVJc_12fps_320x180 --diff_weight 1 --beta_max 1e-4

DATA is a frame store of 320x180 frames or a video, which is prepared once at 12 fps, 320x180 into
<video>_12fps_320x180/ beside it. Training reads single frames (pairs of consecutive frames with --diff_weight) from
the training split; the held-out split is left for `evaluate.py vae`. The loss is the pixel MSE, plus beta times the
KL, plus --diff_weight times the MSE of the change between the two frames. beta is 0 until --beta_start_step (the
autoencoder first learns to reconstruct), then rises linearly over --beta_warmup_steps to --beta_max.

Writes the model folder --out (config.json + model.safetensors: dataset.py encode, train_dit.py and generate.py load
it with no flags), its loss log to logs/<name>.json beside it, and every --sample_every steps a picture of held-out
frames (top) and their reconstructions (bottom) to --samples.

Kill it at any time (Ctrl-C and SIGTERM save a training state first): rerunning the same command continues from the
last state in checkpoints/ beside --out and ends with the same weights as an uninterrupted run (see training.py).
"""
import argparse
from pathlib import Path

import cv2
import numpy as np
import torch

import vae2
from dataset import WindowDataset, open_frames, require_size, spread_frames
from training import add_training_flags, rank_zero_first, train_loop
from utils import UserError, add_config_flags, apply_defaults, atomic_path, autocast, build, from_uint8, get_device, \
    override, positive, run_cli, seed_everything, to_uint8

DEFAULTS = {  # training hyperparameters per preset: steps, batch size, learning rate, beta schedule, picture interval
    "tiny": dict(steps=1200, batch_size=4, lr=1e-3, beta_start_step=100, beta_warmup_steps=100, sample_every=400),
    "default": dict(steps=100_000, batch_size=32, lr=3e-4, beta_start_step=5_000, beta_warmup_steps=20_000,
                    sample_every=1_000),
}


def beta_at(step, args):
    """0 until --beta_start_step, then linear up to --beta_max over --beta_warmup_steps."""
    if step < args.beta_start_step:
        return 0.0
    return args.beta_max * min(1.0, (step - args.beta_start_step) / args.beta_warmup_steps)


@torch.no_grad()
def write_reconstructions(path, model, frames):
    """frames (K, 3, H, W) above their reconstructions decode(mu), side by side, as one PNG; returns the image."""
    with autocast(frames.device):
        recon = model.decode(model.encode(frames)[0])
    image = np.concatenate([np.concatenate(list(to_uint8(x)), axis=1) for x in (frames, recon)], axis=0)
    with atomic_path(path) as tmp:
        cv2.imwrite(str(tmp), image[..., ::-1])
    return image


def main():
    parser = argparse.ArgumentParser(description="Train the ViT-VAE of the latent diffusion pipeline.")
    parser.add_argument("data", help="frame store of 320x180 frames, or a video (prepared once at 12 fps, 320x180)")
    parser.add_argument("--out", default="models/vae2", help="model folder to write (default models/vae2)")
    add_config_flags(parser, vae2.PRESETS, "ViT-VAE (tiny: CPU, tests; default: ~59M parameters, a GPU)")
    parser.add_argument("--steps", type=positive(int), help="training steps (tiny 1200, default 100000)")
    parser.add_argument("--batch_size", type=positive(int), help="frames (or pairs) per step (tiny 4, default 32)")
    parser.add_argument("--lr", type=positive(float), help="peak learning rate (tiny 1e-3, default 3e-4)")
    parser.add_argument("--beta_max", type=float, default=3e-4,
                        help="final weight of the KL, a mean over latent numbers, against the pixel MSE, a mean over "
                             "pixels; 3e-4 is the ELBO of a Gaussian decoder of std 0.05 (default 3e-4)")
    parser.add_argument("--beta_start_step", type=int, help="steps with beta = 0 (tiny 100, default 5000)")
    parser.add_argument("--beta_warmup_steps", type=positive(int),
                        help="steps over which beta rises linearly to --beta_max (tiny 100, default 20000)")
    parser.add_argument("--diff_weight", type=float, default=0.0,
                        help="weight of the frame-difference loss; > 0 trains on pairs of consecutive frames "
                             "(default 0: single frames)")
    parser.add_argument("--samples", default="results/vae2_recon.png",
                        help="PNG of held-out frames and their reconstructions (default results/vae2_recon.png)")
    parser.add_argument("--sample_every", type=positive(int), help="steps between pictures (tiny 400, default 1000)")
    add_training_flags(parser)
    args = parser.parse_args()
    apply_defaults(args, DEFAULTS[args.preset])
    if args.beta_max < 0 or args.diff_weight < 0 or args.beta_start_step < 0:
        raise UserError("--beta_max, --beta_start_step and --diff_weight must not be negative")
    device = get_device(args.device, args.deterministic, args.precision)
    config = override(vae2.PRESETS[args.preset], args.set)

    # data: single frames (pairs with the frame-difference loss) of the training split
    store = rank_zero_first(lambda: open_frames(args.data, size=(config.width, config.height)))
    require_size(store, config.width, config.height)
    dataset = WindowDataset(store, 2 if args.diff_weight > 0 else 1, split="train")
    # the pictures show held-out frames where the store has some, so they show what the VAE generalises to
    picked = spread_frames(store, "val", 4)
    picked = picked if len(picked) else spread_frames(store, "train", 4)
    sample = from_uint8(torch.stack([store.window(int(i), 1)["frames"][0] for i in picked]).to(device))  # (K, 3, H, W)

    # model and loop, seeded once the data is ready (preparing a video or finding it prepared gives the same run)
    seed_everything(args.seed)
    model = build(vae2.ViTVAE, config).to(device)
    print(f"vae2: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(dataset)} training "
          f"windows of {store.path}, {config.tokens} x {config.latent_dim} latents per {config.width}x{config.height} "
          f"frame ({3 * config.height * config.width / (config.tokens * config.latent_dim):.2f}x fewer numbers)")

    def loss_fn(net, batch, step):
        beta = beta_at(step, args)
        loss, logs = net(from_uint8(batch["frames"]), beta, args.diff_weight)
        return loss, {**logs, "beta": beta}

    def on_log(step, current, wandb):  # called at log steps, so pictures come at multiples of both intervals
        if step % args.sample_every == 0 or step == args.steps:
            wandb.image("reconstructions", write_reconstructions(args.samples, current, sample), step)

    out = Path(args.out)
    train_loop(model, loss_fn, dataset, args, device, out, out.parent / "logs" / f"{out.name}.json", name=out.name,
               project="gameworld-vae2", on_log=on_log, unchanged={"data", "out", "samples", "sample_every", "set"})
    print(f"wrote {out} and {args.samples}")


if __name__ == "__main__":
    run_cli(main)
