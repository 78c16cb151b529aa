"""Sample from SiT (latent) or JiT (pixel) checkpoints with the official samplers.

  python sample.py --ckpt RUN                              # 8x8 PNG grid in RUN/samples/
  python sample.py --ckpt ckpt.pt --num-samples 50000 --out samples.npz  # for fid.py
  torchrun --nproc_per_node=8 sample.py --ckpt ckpt.pt --num-samples 50000 --out samples.npz

Time runs as in each official code: SiT from t=1 (noise) to t=0, JiT from t=0 (noise) to t=1.
Shard s draws from (seed, s), so any number of processes, or a resumed rerun, write one npz.
"""
import argparse
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import kernels
from data import (Parser, at_least, check_writable, find_checkpoint, fitting, sampling_weights,
                  setup_device, write_shards)
from model import build_model, in_latent_space, noise_std


def guided(model, x, t, y, cfg_scale, on, dtype):
    """Model output at x (B, ...), t; on: with CFG, cond and uncond in one forward."""
    if on:
        x, y = torch.cat([x, x]), torch.cat([y, torch.full_like(y, model.num_classes)])
    t = torch.full((len(x),), float(t), dtype=dtype, device=x.device)
    out = model(x.to(dtype), t, y)[0].to(x.dtype)
    if not on:
        return out
    cond, uncond = out.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def steps(ts, progress):
    return tqdm(list(zip(ts, ts[1:])), "sampling steps", leave=False, disable=not progress)


@torch.no_grad()
def sit_sampler(model, noise, y, num_steps=50, mode="ode", cfg_scale=1.0, guidance_low=0.0,
                guidance_high=1.0, generator=None, progress=False):
    """SiT from t=1 to t=0 in float64, guided where guidance_low <= t <= guidance_high (the step's
    t, for both Heun calls). ode, heun: dx/dt = v on linspace(1, 0, N+1), Heun on all but the
    last step. sde: diffusion w(t) = 2t on linspace(1, 0.04, N), then a drift-only step to t=0 (N
    evaluations); the score s = -(x + (1-t) v) / t makes the drift v - w s / 2 = (2 - t) v + x."""
    sde = mode == "sde"
    ts = torch.linspace(1, 0.04 if sde else 0, num_steps + 1 - sde, dtype=torch.float64).tolist()
    x = noise.to(torch.float64)
    for i, (t, t_next) in enumerate(steps(ts + [0.0] * sde, progress)):
        on = cfg_scale != 1.0 and guidance_low <= t <= guidance_high
        v = guided(model, x, t, y, cfg_scale, on, noise.dtype)
        if mode == "heun" and i < num_steps - 1:
            v_next = guided(model, x + (t_next - t) * v, t_next, y, cfg_scale, on, noise.dtype)
            v = 0.5 * v + 0.5 * v_next
        if sde:
            v = (2 - t) * v + x
        x = x + (t_next - t) * v
        if sde and i < num_steps - 1:
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float64, device=x.device)
            x = x + math.sqrt(2 * t) * math.sqrt(t - t_next) * eps
    return x


@torch.no_grad()
def jit_sampler(model, z, y, num_steps=50, heun=True, cfg_scale=1.0, interval=(0.0, 1.0),
                progress=False):
    """JiT ODE from noise z on a float32 linspace(0, 1, N+1), Heun but the last step (heun=False:
    Euler); v = (x - z) / max(1 - t, 0.05). CFG where low < t < high (low 0: none), as official."""
    ts = torch.linspace(0, 1, num_steps + 1)  # 0-d float32 entries: the official arithmetic
    low, high = interval

    def velocity(z, t):
        on = cfg_scale != 1.0 and bool(t < high) and (low == 0 or bool(t > low))
        x = guided(model, z, t, y, cfg_scale, on, z.dtype)
        return (x - z) / (1.0 - t).clamp_min(0.05)

    for i, (t, t_next) in enumerate(steps(ts, progress)):
        v = velocity(z, t)
        if heun and i < num_steps - 1:
            v = 0.5 * (v + velocity(z + (t_next - t) * v, t_next))
        z = z + (t_next - t) * v
    return z


@torch.no_grad()
def mean_flow_sampler(model, noise, y, num_steps=1, progress=False):
    """MeanFlow (SiT time): z_r = z_t - (t - r) u(z_t, r, t) on a float32 linspace(1, 0, N+1);
    one step is z_0 = z_1 - u(z_1, 0, 1). Guidance was trained in (train.py --mf-omega)."""
    ts, x = torch.linspace(1, 0, num_steps + 1, device=noise.device), noise
    for t, r in steps(ts, progress):
        u = model(x, t.expand(len(x)), y, h=(t - r).expand(len(x)))[0].float()
        x = x - (t - r) * u
    return x


def sample_latents(model, y, family, mode, num_steps, cfg_scale, interval, noise_scale=1.0,
                   generator=None, progress=False):
    """SiT latents (float64) or JiT pixels for labels y (B,)."""
    shape = (len(y), model.in_channels, model.input_size, model.input_size)
    noise = torch.randn(shape, generator=generator, device=y.device)
    if family == "jit":
        return jit_sampler(model, noise_scale * noise, y, num_steps, mode == "heun", cfg_scale,
                           interval, progress=progress)
    if mode == "meanflow":
        return mean_flow_sampler(model, noise, y, num_steps, progress)
    return sit_sampler(model, noise, y, num_steps, mode, cfg_scale, *interval, generator, progress)


@torch.no_grad()
def generate(model, y, family, vae=None, mode="heun", num_steps=50, cfg_scale=1.0,
             interval=(0.0, 1.0), noise_scale=1.0, generator=None, progress=False):
    """Images for labels y (B,) from an eval-mode model -> uint8 (B, H, W, 3) on the CPU.
    mode: sde | ode | heun | meanflow. vae: decodes latents (SiT), None for pixel models."""
    x = sample_latents(model, y, family, mode, num_steps, cfg_scale, interval, noise_scale,
                       generator, progress)
    x = vae.decode(vae.unscale(x.float())) if vae is not None else x
    x = (x.float() + 1) / 2 * 255
    x = x.round() if family == "jit" else x  # official conversions: JiT rounds, SiT truncates
    return x.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


# Each family's FID protocol as in its official code; flags override it
PROTOCOLS = {
    "sit": dict(mode="sde", num_steps=250, cfg_scale=1.0, guidance_low=0.0, labels="uniform"),
    "jit": dict(mode="heun", num_steps=50, guidance_low=0.1, labels="balanced"),  # CFG by size
}
PROTOCOLS["meanflow"] = dict(PROTOCOLS["sit"], mode="meanflow", num_steps=1)  # CFG: trained in
JIT_CFG = {"B": 3.0, "L": 2.4, "H": 2.2}  # none for other sizes (the demo)


def sample_to_file(model, vae, args, rank=0, world_size=1):
    family, device = args.model.split("-")[0].lower(), next(model.parameters()).device
    n, bs = args.num_samples, args.batch_size

    def make_shard(s):  # shard s draws its labels and noise from (args.seed, s)
        seed = int(np.random.SeedSequence([args.seed, s]).generate_state(1)[0])
        idx = torch.arange(s * bs, min(s * bs + bs, n))
        y = idx * model.num_classes // n  # balanced
        if args.labels == "uniform":
            y = torch.randint(model.num_classes, (len(idx),),
                              generator=torch.Generator().manual_seed(seed))
        with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
            images = generate(model, y.to(device), family, vae, args.mode, args.num_steps,
                              args.cfg_scale, (args.guidance_low, args.guidance_high),
                              args.noise_scale, torch.Generator(device).manual_seed(seed),
                              progress=rank == 0)
        return images, y

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "grid", "compile")}
    write_shards(args.out, n, bs, settings, make_shard, args.grid, rank, world_size)


def fill(args, values):
    """Each setting not given as a flag (still None) from values."""
    vars(args).update({k: v for k, v in values.items() if getattr(args, k) is None})


parser = Parser(__doc__)
add = parser.add_argument
add("--ckpt", required=True, help="checkpoint file (ours or official) or run folder")
add("--ema", action=argparse.BooleanOptionalAction, default=True, help="the EMA weights")
add("--model", help="as in model.py (default: the checkpoint's)")
add("--image-size", type=at_least(1), help="default: the checkpoint's, else 256")
add("--num-classes", type=at_least(1), help="default: the checkpoint's, else 1000")
add("--vae-weights", help="SD-VAE (default: the checkpoint's, else sd-vae-ft-mse)")
add("--vae-stats", help="latent statistics file (default: the checkpoint's)")
add("--mode", choices=["sde", "ode", "heun", "meanflow"], help="ode: Euler (default: by family)")
add("--num-steps", type=at_least(1), help="default: SiT 250, JiT 50, MeanFlow 1")
add("--cfg-scale", type=float, help="default: 1; JiT-B 3, L 2.4, H 2.2")
add("--guidance-low", type=float, help="CFG for low <= t <= high, JiT: < (default SiT 0, JiT 0.1)")
add("--guidance-high", type=float, default=1.0, help="see --guidance-low")
add("--noise-scale", type=float, help="JiT noise std (default: the checkpoint's, else by size)")
add("--labels", choices=["uniform", "balanced"], help="balanced: class i * C // N for sample i")
add("--num-samples", type=at_least(1), default=64, help="number of images")
add("--out", help=".npz for fid.py or .png grid (default: RUN/samples/ or beside the file)")
add("--grid", type=at_least(0), default=0, help="also a .png grid of the first N")
add("--batch-size", type=at_least(1), default=256, help="images per forward and per shard")
add("--seed", type=at_least(0), default=0, help="shard s draws from (seed, s)")
add("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast")
add("--compile", action="store_true", help="torch.compile the model")


def main(argv=None):
    args = parser.parse_args(argv)
    try:  # the file, not the run, goes into the shards' settings
        args.ckpt = os.path.abspath(find_checkpoint(args.ckpt))
        weights, saved = sampling_weights(args.ckpt, args.ema)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"--ckpt {e}" if isinstance(e, FileNotFoundError) else str(e))
    mean_flow = saved.pop("objective") == "meanflow"
    tuned = saved.pop("tuned_vae", None)  # a REPA-E run's own VAE, unless --vae-weights is given
    vae_from = [f"--{k.replace('_', '-')} {saved[k]}" for k in ("vae_weights", "vae_stats")
                if saved[k] is not None and getattr(args, k) is None]
    fill(args, saved)
    if args.out is None:  # a grid beside the checkpoint; a run's in RUN/samples/
        folder, stem = os.path.split(os.path.splitext(args.ckpt)[0])
        args.out = os.path.join(folder, f"{stem}-samples.png")
        if os.path.basename(folder) == "checkpoints":
            args.out = os.path.join(os.path.dirname(folder), "samples", f"sample-{stem}.png")
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    if not args.out.endswith((".npz", ".png")):
        parser.error(f"--out {args.out} must end in .npz or .png")
    check_writable(parser, [("--out", args.out), ("--out", args.grid and args.out[:-4] + ".png")])
    try:
        model = build_model(args.model, args.image_size, args.num_classes, mean_flow)
        with fitting(args.ckpt, "--ckpt"):
            model.load_state_dict(weights)
    except ValueError as e:
        parser.error(f"{e} (--model {args.model})")
    family = args.model.split("-")[0].lower()
    fill(args, PROTOCOLS["meanflow" if mean_flow else family])
    fill(args, dict(cfg_scale=JIT_CFG.get(args.model[4], 1.0),
                    noise_scale=noise_std(family, args.image_size)))
    if args.guidance_low > args.guidance_high:  # else no step would be guided, unsaid
        parser.error(f"--guidance-low {args.guidance_low} is above --guidance-high")
    modes = {"sit": ["sde", "ode", "heun"], "jit": ["heun", "ode"]}[family]
    modes += ["meanflow"] if mean_flow and args.cfg_scale == 1 else []
    if args.mode not in modes:  # a MeanFlow model learnt its guidance in training
        use = " or ".join(modes) + (", or --cfg-scale 1" * mean_flow)
        parser.error(f"--mode {args.mode} does not fit this checkpoint: use --mode {use}")
    device, rank, world_size = setup_device()
    vae = None
    if in_latent_space(args.model):
        from encoders import load_vae  # only SiT needs the VAE (and encoders' imports)
        from repae import tuned_vae
        torch.manual_seed(args.seed)  # --vae-weights random: the same decoder on every rank
        try:
            own = tuned and args.vae_weights is None
            vae = tuned_vae(*tuned) if own else load_vae(args.vae_weights, args.vae_stats)
            vae = vae.to(device).eval()
        except (RuntimeError, ValueError) as e:  # not cached, or a file that does not load
            where = f" (the checkpoint's {' '.join(vae_from)}: a flag overrides it)"
            parser.error(f"{e}{where if vae_from else ''}")
    model = model.to(device).eval().requires_grad_(False)
    model = kernels.enable(model) if device.type == "cuda" else model
    model = torch.compile(model) if args.compile else model
    sample_to_file(model, vae, args, rank, world_size)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # each shard is written whole: what is done stays done
        raise SystemExit("interrupted: the finished shards are kept; the same command goes on "
                         "from them") from None
