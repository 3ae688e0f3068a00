"""Train the causal DiT of the diffusion world model on VAE latents with flow matching.

  python train_dit.py videos/coinrun_wide --vae models/vae2 --preset tiny --steps 300            # CPU, minutes
  python train_dit.py videos/z8r255LoVJc.mp4 --vae models/vae2                                    # one GPU
  python train_dit.py videos/z8r255LoVJc_12fps_320x180_latents --vae models/vae2 --context_forcing 2
  python train_dit.py videos/coinrun_wide_latents --vae models/vae2 --lam models/lam --preset tiny  # steerable

DATA is a latent store (`dataset.py encode`), or a frame store or video that is encoded once with --vae and cached
beside it. Each step draws clips of --seq_len frames from the training split, samples latents from the VAE's
posterior (mu + sigma * eps), scales them to unit variance and takes the flow-matching loss of dit.py. The EMA of the
weights is what lands in --out (config.json holds the latent scale, so generation needs no flags), and a log of the
losses in logs/dit.json beside it; every --sample_every steps a continuation of a held-out clip is written to
--samples (prompt, then the EMA model's frames).

With --lam (a latent action model from train_lam.py) the DiT learns to follow latent actions: the LAM labels every
transition of the store once (dataset.open_latent_actions, again only when its weights change), and each frame is
conditioned on the action that led to it, dropped for --set action_dropout of the frames (default 0.1) so that the
same model also runs unconditioned, for classifier-free guidance. Without --lam the DiT is unconditioned. With
--actions true it follows the game's own actions from the store instead, and --oversample_turns draws the clips where
the player turns round more often. A VAE trained with a focus on the player passes it on: the DiT weighs the error
of those patches --set focus_weight times the rest's.

Kill it at any time (Ctrl-C and SIGTERM save a training state first): rerunning the same command continues from the
last state in checkpoints/ beside --out and ends with the same weights as an uninterrupted run (see training.py).
"""
import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

import dit
from dataset import FrameStore, WindowDataset, open_latent_actions, open_latents
from training import add_training_flags, rank_zero_first, train_loop
from utils import UserError, add_config_flags, apply_defaults, autocast, build, from_uint8, get_device, load_model, \
    override, positive, run_cli, seed_everything, to_uint8, write_mp4
from vae2 import ViTVAE

DEFAULTS = {  # training hyperparameters per preset: steps, batch size, peak learning rate, EMA decay
    "tiny": dict(steps=600, batch_size=4, lr=1e-2, ema_decay=0.99),
    "small": dict(steps=20_000, batch_size=32, lr=3e-4, ema_decay=0.999),
    "default": dict(steps=100_000, batch_size=64, lr=2e-4, ema_decay=0.9999),
}


def sample_latents(batch, scale):
    """A draw from the VAE posterior of each frame, scaled to unit variance: (B, T, N, C)."""
    mu, logvar = batch["mu"].float(), batch["logvar"].float()
    return (mu + (0.5 * logvar).exp() * torch.randn_like(mu)) * scale


def write_sample(path, vae, model, clip, prompt_frames, fps, steps=10):
    """Encode the first prompt_frames of clip (T, 3, H, W), continue them to the clip's length, write prompt +
    continuation as an mp4 with the true clip beside it."""
    scale = model.config.latent_scale
    with torch.no_grad(), autocast(clip.device):
        mu, logvar = (t.float() for t in vae.encode(clip[:prompt_frames]))
        context = (mu + (0.5 * logvar).exp() * torch.randn_like(mu))[None] * scale  # (1, P, N, C)
        generated = dit.Sampler(model, steps).rollout(context, len(clip) - prompt_frames)[0] / scale
        decoded = vae.decode(generated)
    video = torch.cat([clip[:prompt_frames], decoded], dim=0)
    write_mp4(path, np.concatenate([to_uint8(clip), to_uint8(video)], axis=2), fps)


def main():
    parser = argparse.ArgumentParser(description="Train the diffusion world model's DiT on VAE latents.")
    parser.add_argument("data", help="latent store, frame store (320x180) or video; frames are encoded once with --vae")
    parser.add_argument("--vae", default="models/vae2", help="the trained ViT-VAE folder (default models/vae2)")
    parser.add_argument("--out", default="models/dit", help="model folder to write (default models/dit)")
    add_config_flags(parser, dit.PRESETS, "DiT (tiny: CPU tests, small, default: ~257M parameters)")
    parser.add_argument("--seq_len", type=positive(int), help="frames per training clip (tiny 12, default 24)")
    parser.add_argument("--steps", type=positive(int), help="training steps (tiny 600, default 100000)")
    parser.add_argument("--batch_size", type=positive(int), help="clips per step (tiny 4, default 64)")
    parser.add_argument("--lr", type=positive(float), help="peak learning rate (tiny 1e-2, default 2e-4)")
    parser.add_argument("--ema_decay", type=float, help="EMA decay of the saved weights (tiny 0.99, default 0.9999)")
    parser.add_argument("--self_forcing_p", type=float, default=0.25,
                        help="probability of the seed's self-forcing per clip (noise endpoint re-estimated by the "
                             "model, see dit.py); 0 turns it off (default 0.25)")
    parser.add_argument("--context_forcing", type=int, default=0, metavar="R",
                        help="replace R frames of each clip by the model's own rollout and learn to continue from "
                             "them (0 = off, default)")
    parser.add_argument("--rollout_steps", type=positive(int), default=4,
                        help="Euler steps per frame of the context-forcing rollout (default 4)")
    parser.add_argument("--actions", choices=["latent", "true"], default="latent",
                        help="what each frame is conditioned on: latent, the actions of --lam (without --lam, "
                             "nothing: an unconditioned DiT); true, the game's own actions recorded in the store "
                             "(procgen, ALE: download.py), so that the world plays with the game's keys "
                             "(default latent)")
    parser.add_argument("--oversample_turns", type=positive(int), default=1,
                        help="with --actions true: draw the clips where the player turns round (a left after a right "
                             "or the reverse) this many times as often as the others (default 1)")
    parser.add_argument("--lam", help="a latent action model folder (train_lam.py) whose actions the DiT learns to "
                                      "follow (default: none, an unconditioned DiT)")
    parser.add_argument("--lam_seq_len", type=positive(int), default=4,
                        help="frames per clip the LAM labels, its training --seq_len (default 4, the tiny preset's)")
    parser.add_argument("--samples", default="results/dit_sample.mp4",
                        help="mp4 of a held-out continuation beside the true clip (default results/dit_sample.mp4)")
    parser.add_argument("--sample_every", type=positive(int), default=1000,
                        help="steps between sample videos (default 1000)")
    add_training_flags(parser)
    args = parser.parse_args()
    apply_defaults(args, DEFAULTS[args.preset])
    if not 0 <= args.self_forcing_p <= 1:
        raise UserError(f"--self_forcing_p must be in [0, 1], not {args.self_forcing_p}")
    device = get_device(args.device, args.deterministic, args.precision)
    config = override(dit.PRESETS[args.preset], args.set)

    # data: latents of the training split, the VAE that made them, a held-out clip for samples
    vae = load_model(ViTVAE, args.vae, device)
    latents = rank_zero_first(lambda: open_latents(args.data, args.vae, device))
    # the latent grid is the VAE's; --seq_len, when given, overrides the preset's
    config = dataclasses.replace(config, rows=vae.config.rows, cols=vae.config.cols, latent_dim=vae.config.latent_dim,
                                 latent_scale=float(latents.scale), seq_len=args.seq_len or config.seq_len,
                                 focus=vae.config.focus_patches)
    if args.actions == "true":
        if args.lam:
            raise UserError("--actions true conditions on the store's true actions: leave out --lam")
        if not latents.has_actions:
            raise UserError(f"{args.data} has no true actions (a store from a game collector, download.py procgen:... "
                            f"or ale:..., has them); train on latent actions with --lam instead")
        config = dataclasses.replace(config, num_actions=int(latents.meta["num_actions"]), actions="true",
                                     action_names=list(latents.meta.get("action_names") or []),
                                     game=str(latents.meta["source"]))
    elif args.lam:
        if args.lam_seq_len < 2:
            raise UserError("--lam_seq_len must be at least 2 (a clip of one frame holds no transition)")
        action_model = rank_zero_first(lambda: open_latent_actions(latents, args.lam, device, args.lam_seq_len))
        config = dataclasses.replace(config, num_actions=action_model.config.num_actions, lam_clip_len=args.lam_seq_len)
    if not 0 <= args.context_forcing < config.seq_len - 1:
        raise UserError(f"--context_forcing must be in [0, {config.seq_len - 2}] for --seq_len {config.seq_len}")
    dataset = WindowDataset(latents, config.seq_len)
    if args.actions == "true":
        dataset.oversample(latents.turns(), args.oversample_turns)
    frames = FrameStore(latents.meta["frames"]) if Path(latents.meta["frames"]).is_dir() else None
    if frames is None:
        print(f"no sample videos: the frame store {latents.meta['frames']} behind the latents is gone")
    sample_clip = None
    if frames is not None:
        try:  # prompt seq_len - 1 frames and continue past the training length, so that the window slides
            held_out = WindowDataset(frames, config.seq_len + config.seq_len // 2, split="val")
            sample_clip = from_uint8(held_out[len(held_out) // 2]["frames"].to(device))
        except UserError as e:
            print(f"no sample videos: {e}")

    # model and loop; seeded once the data is ready, so that preparing or encoding it (which builds a VAE and draws
    # random numbers) or finding it cached gives the same run
    seed_everything(args.seed)
    model = build(dit.DiT, config).to(device)
    rollouts = dit.Sampler(model, args.rollout_steps)  # context forcing's; its cache is made once

    def loss_fn(net, batch, step):
        x1, frame_weight = sample_latents(batch, config.latent_scale), None
        actions = batch.get("actions" if config.actions == "true" else "latent_actions")
        if args.context_forcing:
            # the model's own sampler; the memory planner's fake copy of the model (training.step_settings) gets one
            # of its own, so that no fake tensor lands in the real sampler's cache
            sampler = rollouts if getattr(net, "module", net) is model else dit.Sampler(net, args.rollout_steps)
            x1, frame_weight = dit.context_forced(sampler, x1, args.context_forcing, actions)
        return net(x1, args.self_forcing_p, frame_weight, actions=actions)

    def on_log(step, ema, wandb):
        if sample_clip is not None and (step % args.sample_every == 0 or step == args.steps):
            write_sample(args.samples, vae, ema, sample_clip, config.seq_len - 1, frames.fps)

    train_loop(model, loss_fn, dataset, args, device, Path(args.out), Path(args.out).parent / "logs" / "dit.json",
               name="dit", project="gameworld-dit", ema_decay=args.ema_decay, on_log=on_log,
               unchanged={"data", "out", "vae", "samples", "sample_every", "set"})


if __name__ == "__main__":
    run_cli(main)
