"""Sample from SiT (latent) or JiT (pixel) checkpoints with the official samplers.

  python sample.py --ckpt RUN                                   # 8x8 PNG grid in RUN/samples/
  python sample.py --ckpt ckpt.pt --num-samples 50000 --out samples.npz  # ADM npz for fid.py
  torchrun --nproc_per_node=8 sample.py --ckpt ckpt.pt --num-samples 50000 --out samples.npz
  python sample.py --bench --model SiT-B/2 --batch-size 256     # img/s fp32 vs bf16 (random init)
  python sample.py --ckpt out/SiT-demo-4-none-meanflow          # MeanFlow: one step per image

Without --out the grid goes beside the checkpoint (default_out), never into the current directory.
Time runs as in each official codebase: SiT from t=1 (noise) to t=0 (data), JiT from t=0 (noise)
to t=1 (data). Sample i is in shard i // batch-size, whose noise (and uniform labels) come from
(seed, shard): the npz is the same for any number of processes, and a rerun with the same flags
resumes from the finished shards in <out>.shards/.
"""
import argparse
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import kernels
from data import (check_at_least, check_writable, find_checkpoint,
                  load_checkpoint as read_checkpoint, save_grid, setup_device)
from model import build_model, in_latent_space, models, noise_std


def guided(model, x, t, y, cfg_scale, on, dtype):
    """Network output at state x (B, ...) and time t; guided (on): conditional and null-class rows
    in one forward, combined as uncond + cfg_scale * (cond - uncond)."""
    if on:
        x, y = torch.cat([x, x]), torch.cat([y, torch.full_like(y, model.num_classes)])
    t = torch.full((len(x),), float(t), dtype=dtype, device=x.device)
    out = model(x.to(dtype), t, y)[0].to(x.dtype)
    if not on:
        return out
    cond, uncond = out.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def euler_sampler(model, noise, y, num_steps=50, heun=False, cfg_scale=1.0, guidance_low=0.0,
                  guidance_high=1.0):
    """SiT ODE dx/dt = v on linspace(1, 0, N+1) in float64, Heun correction on all but the last
    step. Guidance where guidance_low <= t <= guidance_high (t of the step start, for both Heun
    evaluations)."""
    ts = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    x = noise.to(torch.float64)
    for i, (t, t_next) in enumerate(zip(ts, ts[1:])):
        on = cfg_scale != 1.0 and guidance_low <= t <= guidance_high
        v = guided(model, x, t, y, cfg_scale, on, noise.dtype)
        if heun and i < num_steps - 1:
            v_next = guided(model, x + (t_next - t) * v, t_next, y, cfg_scale, on, noise.dtype)
            v = 0.5 * v + 0.5 * v_next
        x = x + (t_next - t) * v
    return x


@torch.no_grad()
def euler_maruyama_sampler(model, noise, y, num_steps=250, cfg_scale=1.0, guidance_low=0.0,
                           guidance_high=1.0, generator=None):
    """SiT SDE with diffusion w(t) = 2t on linspace(1, 0.04, N), then one drift-only step to t=0
    (N evaluations). On the linear path the score is s = -(x + (1-t) v) / t, so the drift
    v - w s / 2 is (2 - t) v + x."""
    ts = torch.linspace(1, 0.04, num_steps, dtype=torch.float64).tolist() + [0.0]
    x = noise.to(torch.float64)
    for i, (t, t_next) in enumerate(zip(ts, ts[1:])):
        on = cfg_scale != 1.0 and guidance_low <= t <= guidance_high
        v = guided(model, x, t, y, cfg_scale, on, noise.dtype)
        x = x + ((2 - t) * v + x) * (t_next - t)
        if i < num_steps - 1:
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float64, device=x.device)
            x = x + math.sqrt(2 * t) * math.sqrt(t - t_next) * eps
    return x


@torch.no_grad()
def jit_sampler(model, noise, y, num_steps=50, heun=True, cfg_scale=1.0, interval=(0.0, 1.0),
                t_eps=0.05):
    """JiT ODE on a float32 linspace(0, 1, N+1): Heun steps then a last Euler step (2N-1
    evaluations; heun=False: all Euler). Velocity from the x-prediction, v = (x - z) / max(1 - t,
    t_eps). Guidance where low < t < high (no lower bound when low == 0), compared in float32 as
    the official code."""
    ts = torch.linspace(0, 1, num_steps + 1)  # 0-d float32 entries keep the official arithmetic
    low, high = interval

    def velocity(z, t):
        on = cfg_scale != 1.0 and bool(t < high) and (low == 0 or bool(t > low))
        return (guided(model, z, t, y, cfg_scale, on, z.dtype) - z) / (1.0 - t).clamp_min(t_eps)

    z = noise
    for i, (t, t_next) in enumerate(zip(ts, ts[1:])):
        v = velocity(z, t)
        if heun and i < num_steps - 1:
            v = 0.5 * (v + velocity(z + (t_next - t) * v, t_next))
        z = z + (t_next - t) * v
    return z


@torch.no_grad()
def mean_flow_sampler(model, noise, y, num_steps=1):
    """MeanFlow (SiT time): z_r = z_t - (t - r) u(z_t, r, t) on a float32 linspace(1, 0, N+1); one
    step is z_0 = z_1 - u(z_1, 0, 1). Guidance was trained in (train.py --mf-omega/--mf-kappa)."""
    ts, x = torch.linspace(1, 0, num_steps + 1, device=noise.device), noise
    for t, r in zip(ts, ts[1:]):
        u = model(x, t.expand(len(x)), y, h=(t - r).expand(len(x)))[0].float()
        x = x - (t - r) * u
    return x


def sample_latents(model, y, family, mode, num_steps, cfg_scale, interval, noise_scale=1.0,
                   generator=None):
    """The sampler for labels y (B,) from noise drawn with generator: SiT latents (float64) or JiT
    pixels."""
    size = model.input_size
    noise = torch.randn(len(y), model.in_channels, size, size, generator=generator, device=y.device)
    if family == "jit":
        return jit_sampler(model, noise_scale * noise, y, num_steps, mode == "heun", cfg_scale,
                           interval)
    if mode == "meanflow":
        return mean_flow_sampler(model, noise, y, num_steps)
    if mode == "sde":
        return euler_maruyama_sampler(model, noise, y, num_steps, cfg_scale, *interval,
                                      generator=generator)
    return euler_sampler(model, noise, y, num_steps, mode == "heun", cfg_scale, *interval)


@torch.no_grad()
def generate(model, y, family, vae=None, mode="heun", num_steps=50, cfg_scale=1.0,
             interval=(0.0, 1.0), noise_scale=1.0, generator=None):
    """Images for labels y (B,) from an eval-mode model -> uint8 (B, H, W, 3) on the CPU.
    mode: sde | ode | heun | meanflow. vae: decodes latents (SiT), None for pixel models."""
    x = sample_latents(model, y, family, mode, num_steps, cfg_scale, interval, noise_scale,
                       generator)
    x = ((vae.decode(vae.unscale(x.float())) if vae is not None else x).float() + 1) / 2 * 255
    x = x.round() if family == "jit" else x  # official conversions: JiT rounds, SiT truncates
    return x.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def sampling_defaults(name, mean_flow):
    """Official FID protocol per model: SiT SDE 250 steps without CFG; JiT Heun 50, its CFG,
    interval (0.1, 1]; MeanFlow: 1 step, guidance trained in."""
    if mean_flow:
        return "meanflow", 1, 1.0, 0.0, 1.0
    if name.startswith("SiT"):
        return "sde", 250, 1.0, 0.0, 1.0
    cfg = {"B": 3.0, "L": 2.4, "H": 2.2}.get(name[4], 1.0)  # no CFG for non-paper sizes
    return "heun", 50, cfg, 0.1, 1.0


def shard_seed(seed, shard):
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


def sample_to_file(model, vae, args, rank=0, world_size=1):
    """Generate args.num_samples images by shards (rank r: every world_size-th missing one); rank 0 writes --out."""
    family, device = args.model.split("-")[0].lower(), next(model.parameters()).device
    n, bs, shard_dir = args.num_samples, args.batch_size, args.out + ".shards"
    num_shards = math.ceil(n / bs)
    shard_path = lambda s: os.path.join(shard_dir, f"{s:06d}.npz")
    settings = json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in ("out", "grid", "compile")})
    if rank == 0:
        os.makedirs(shard_dir, exist_ok=True)
        path = os.path.join(shard_dir, "settings.json")
        old = open(path).read() if os.path.exists(path) else settings
        if old != settings:
            raise SystemExit(f"{shard_dir} holds shards made with other flags ({old}); "
                             "rerun with those flags or delete the folder")
        with open(path, "w") as f:
            f.write(settings)
    todo = [s for s in range(num_shards) if not os.path.exists(shard_path(s))]
    if world_size > 1:  # every rank lists the same missing shards before any is written
        dist.barrier()
    for s in tqdm(todo[rank::world_size], desc=f"{len(todo)} of {num_shards} shards to sample", disable=rank != 0):
        seed = shard_seed(args.seed, s)
        idx = torch.arange(s * bs, min(s * bs + bs, n))
        y = (idx * model.num_classes // n if args.labels == "balanced"  # class i * C // N (JiT) or uniform (SiT)
             else torch.randint(model.num_classes, (len(idx),), generator=torch.Generator().manual_seed(seed)))
        with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
            images = generate(model, y.to(device), family, vae, args.mode, args.num_steps, args.cfg_scale,
                              (args.guidance_low, args.guidance_high), args.noise_scale,
                              torch.Generator(device).manual_seed(seed))
        np.savez(shard_path(s)[:-4] + ".tmp.npz", images=images.numpy(), labels=y.numpy())
        os.replace(shard_path(s)[:-4] + ".tmp.npz", shard_path(s))  # a shard file is complete or absent
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        shards = [np.load(shard_path(s)) for s in range(num_shards)]
        images, labels = (np.concatenate([sh[k] for sh in shards]) for k in ("images", "labels"))
        if args.out.endswith(".npz"):
            np.savez(args.out, arr_0=images, arr_1=labels)
        if args.grid or args.out.endswith(".png"):
            save_grid(images[:args.grid or n], args.out[:-4] + ".png")
        shutil.rmtree(shard_dir)
        print(f"wrote {args.out}: {images.shape[0]} images {images.shape[1:]}")


def bench(model, args, device):
    """img/s and peak memory of the sampler alone (no VAE) on one batch, fp32 (+TF32) vs bf16, and their distance."""
    family, interval = args.model.split("-")[0].lower(), (args.guidance_low, args.guidance_high)
    y = torch.randint(model.num_classes, (args.batch_size,), generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    for precision in ("fp32", "bf16"):
        with torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
            sample_latents(model, y, family, args.mode, 2, args.cfg_scale, interval)  # warm-up (and compile)
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            t0 = time.time()
            out[precision] = sample_latents(model, y, family, args.mode, args.num_steps, args.cfg_scale, interval,
                                            args.noise_scale, torch.Generator(device).manual_seed(args.seed)).double()
            torch.cuda.synchronize()
        speed, mem = args.batch_size / (time.time() - t0), torch.cuda.max_memory_allocated() / 2**30
        print(f"{args.model} {args.mode}-{args.num_steps} cfg {args.cfg_scale} batch {args.batch_size} {precision}: "
              f"{speed:.2f} img/s, peak {mem:.1f} GiB")
    print(f"bf16 vs fp32 relative L2 of the samples: {((out['bf16'] - out['fp32']).norm() / out['fp32'].norm()):.3e}")


def default_out(ckpt):
    """The grid's path without --out: for a train.py checkpoint RUN/checkpoints/NAME.pt the run's own
    RUN/samples/sample-NAME.png (train.py's grids are NAME.png there), else FILE-samples.png beside it."""
    folder, stem = os.path.dirname(ckpt), os.path.splitext(os.path.basename(ckpt))[0]
    if os.path.basename(folder) == "checkpoints":
        return os.path.join(os.path.dirname(folder), "samples", f"sample-{stem}.png")
    return os.path.join(folder, f"{stem}-samples.png")


def load_checkpoint(path, ema):
    """(state dict, saved settings) from our checkpoints, official SiT/REPA/iREPA ones or official JiT ones (EMA
    'model_ema1', keys under 'net.'). Sampling needs neither the projector nor JiT's stored RoPE tables (recomputed)."""
    try:
        ckpt = read_checkpoint(path)  # as data: tensors, containers and the official argparse Namespace args
    except ValueError as e:
        parser.error(f"--ckpt {e}")
    if not isinstance(ckpt, dict):
        parser.error(f"--ckpt {path}: not a checkpoint (a {type(ckpt).__name__}, not a dict of weights)")
    key = ("ema" if "ema" in ckpt else "model_ema1") if ema else "model"
    if key not in ckpt:
        parser.error(f"--ckpt {path} has no '{key}' weights (keys: {sorted(ckpt)})")
    a = ckpt.get("args") or {}
    a = a if isinstance(a, dict) else vars(a)
    saved = dict(model=a.get("model"), image_size=a.get("image_size", a.get("resolution", a.get("img_size"))),
                 num_classes=a.get("num_classes", a.get("class_num")), vae_weights=a.get("vae_weights"),
                 vae_stats=a.get("vae_stats"), noise_scale=a.get("noise_scale"), objective=a.get("objective"))
    sd = {k.removeprefix("net."): v for k, v in ckpt[key].items() if not k.endswith(("freqs_cos", "freqs_sin"))}
    return {k: v for k, v in sd.items() if not k.startswith("projectors.")}, saved


parser = argparse.ArgumentParser(description="Sample images from SiT / JiT checkpoints (see the module docstring).")
add = parser.add_argument
add("--ckpt", help="checkpoint: ours, official iREPA/REPA SiT or official JiT")
add("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights (JiT: the first EMA)")
add("--model", help="model name as in model.py, e.g. SiT-XL/2, JiT-B/16 (default: from the checkpoint)")
add("--image-size", type=int, help="image resolution (default: from the checkpoint, else 256)")
add("--num-classes", type=int, help="classes; the null class is this index (default: from the checkpoint, else 1000)")
add("--vae-weights", help="SD-VAE weights for SiT (default: the checkpoint's, else sd-vae-ft-mse from the hub)")
add("--vae-stats", help="per-channel latent stats file as the official iREPA (default: from the checkpoint)")
add("--mode", choices=["sde", "ode", "heun", "meanflow"], help="SiT: sde (default), ode (Euler) or heun (ODE); "
    "JiT: heun (default, last step Euler) or ode (Euler); a MeanFlow checkpoint: meanflow (default, its own "
    "steps) or, with its velocity (h = 0), sde, ode or heun")
add("--num-steps", type=int, help="sampling steps (default: SiT 250, JiT 50, MeanFlow 1)")
add("--cfg-scale", type=float, help="classifier-free guidance scale (default: SiT 1.0, JiT B 3.0, L 2.4, H 2.2)")
add("--guidance-low", type=float, help="guidance interval low end in the family's time: SiT guides low <= t <= high "
    "(t=1 noise), JiT low < t < high (t=1 data; low 0: no lower bound) (default: SiT 0, JiT 0.1)")
add("--guidance-high", type=float, help="guidance interval high end (default: 1)")
add("--noise-scale", type=float, help="JiT initial noise std (default: from the checkpoint, else 1, 2 from 512 px)")
add("--labels", choices=["uniform", "balanced"], help="uniform random (SiT protocol, SiT default) or class "
    "i * C // N for sample i (JiT protocol, JiT default)")
add("--num-samples", type=int, default=64, help="number of images")
add("--out", help=".npz (ADM format for fid.py) or .png (a grid of all samples) (default: a grid beside the "
    "checkpoint: RUN/samples/sample-NNNNNNN.png for RUN/checkpoints/NNNNNNN.pt, else CKPT-samples.png)")
add("--grid", type=int, default=0, help="PNG grid of the first N samples (.npz --out: beside it; .png: default all)")
add("--batch-size", type=int, default=256, help="images per forward and per shard, on each process")
add("--seed", type=int, default=0, help="global seed; shard s draws from a generator seeded with (seed, s)")
add("--precision", choices=["fp32", "bf16"], default="fp32", help="fp32 (+TF32 matmuls, official) or bf16 autocast")
add("--compile", action="store_true", help="torch.compile the model")
add("--bench", action="store_true", help="time one batch, fp32 vs bf16 (GPU; random weights without --ckpt)")


def main(argv=None):
    args = parser.parse_args(argv)
    if not args.ckpt and not args.bench:
        parser.error("--ckpt is required (or --bench with --model for a random-init model)")
    check_at_least(parser, args, ("num_samples", "batch_size", "num_steps"))
    if args.ckpt:
        try:  # the file itself, in the shards' settings: a newer checkpoint in a run folder must not join them
            args.ckpt = os.path.abspath(find_checkpoint(args.ckpt))
        except FileNotFoundError as e:
            parser.error(f"--ckpt {e}")
    sd, saved = load_checkpoint(args.ckpt, args.ema) if args.ckpt else (None, {})
    mean_flow = saved.pop("objective", None) == "meanflow"
    vae_from_ckpt = [f"--{k.replace('_', '-')} {v}" for k, v in saved.items()
                     if k.startswith("vae") and v is not None and getattr(args, k) is None]
    for k, v in saved.items():  # flags given on the command line win
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    if args.model not in models:
        parser.error(f"--model {args.model} is not one of {sorted(models)}")
    family = args.model.split("-")[0].lower()
    keys = ["mode", "num_steps", "cfg_scale", "guidance_low", "guidance_high", "image_size", "num_classes", "labels"]
    labels = "uniform" if family == "sit" else "balanced"
    for k, v in zip(keys, [*sampling_defaults(args.model, mean_flow), 256, 1000, labels]):
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    args.noise_scale = noise_std(family, args.image_size) if args.noise_scale is None else args.noise_scale
    if args.noise_scale <= 0 or args.grid < 0:
        parser.error(f"--noise-scale must be above 0 and --grid at least 0, got {args.noise_scale} and {args.grid}")
    if args.guidance_low > args.guidance_high:
        parser.error(f"--guidance-low {args.guidance_low} is above --guidance-high {args.guidance_high}")
    if family == "jit" and args.mode == "sde":
        parser.error("JiT samples with --mode heun or ode; sde is for SiT")
    if args.mode == "meanflow" and not mean_flow:
        parser.error("--mode meanflow needs a MeanFlow checkpoint (train.py --objective meanflow)")
    if args.mode == "meanflow" and args.cfg_scale != 1:
        parser.error("a MeanFlow model learnt its guidance in training: sample with --cfg-scale 1")
    if args.out is None and args.ckpt:
        args.out = default_out(args.ckpt)
        try:
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
        except OSError as e:
            parser.error(f"cannot make the folder of the default grid {args.out} ({e}): give --out")
    if args.out and not args.out.endswith((".npz", ".png")):
        parser.error(f"--out {args.out} must end in .npz or .png")
    check_writable(parser, [("--out", args.out)])
    made = [args.out, args.grid and args.out.endswith(".npz") and args.out[:-4] + ".png"] if args.out else []
    made = [f for f in made if f and os.path.exists(f)]
    if made and not os.path.isdir(args.out + ".shards"):  # a finished output is never overwritten
        parser.error(f"{' and '.join(made)} exists already: pass another --out (or move it away)")
    if args.grid > args.num_samples:
        parser.error(f"--grid {args.grid} asks for more images than --num-samples {args.num_samples}")
    if args.bench and not torch.cuda.is_available():
        parser.error("--bench needs a GPU")

    vae = None
    if in_latent_space(args.model) and not args.bench:  # before building the model: missing weights fail at once
        from encoders import load_vae  # only SiT needs the VAE (and encoders' imports)
        torch.manual_seed(args.seed)  # --vae-weights random: the same decoder on every rank and rerun
        try:
            vae = load_vae(args.vae_weights, args.vae_stats)
        except (RuntimeError, OSError) as e:  # not cached and not downloadable, or no such file
            where = f" (from the checkpoint: {' '.join(vae_from_ckpt)}; a flag overrides it)"
            parser.error(f"{e}{where if vae_from_ckpt else ''}")

    device, rank, world_size = setup_device()  # torchrun: the ranks share the folder of --out
    model = build_model(args.model, args.image_size, args.num_classes, mean_flow)
    if sd is not None:
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            parser.error(f"--ckpt {args.ckpt} does not fit --model {args.model} --image-size {args.image_size} "
                         f"--num-classes {args.num_classes}: {str(e)[:1500]}")
    elif args.bench:  # random weights: a fresh adaLN-Zero model outputs 0, which would compare nothing
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
    model = model.to(device).eval().requires_grad_(False)
    if device.type == "cuda":  # GPU fast paths (kernels.py): same functions, same parameter names
        model = kernels.enable(model)
    model = torch.compile(model) if args.compile else model
    if args.bench:
        return bench(model, args, device)
    sample_to_file(model, None if vae is None else vae.to(device).eval(), args, rank, world_size)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
