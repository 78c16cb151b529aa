"""
Train SiT (SD-VAE latents) or JiT (pixels) with REPA or iREPA, from a CPU demo to multi-node DDP.

    python train.py                                  # offline demo, generated data, CPU ok
    python train.py --encoder dinov2-vit-s --encoder-weights random --irepa   # iREPA, offline
    torchrun --nproc_per_node=8 train.py --encoder dinov2-vit-b --irepa --data-path /imagenet/train
    torchrun --nproc_per_node=8 train.py --model JiT-B/16 --encoder dinov2-vit-b --irepa ...
    python train.py --resume out/JiT-demo-16-none    # continue exactly where it stopped
    python train.py --objective meanflow             # MeanFlow's offline demo (pixel SiT)
    torchrun --nproc_per_node=8 train.py --objective meanflow --encoder dinov3-vit-b16 --irepa

Without --model and a data path the offline demo runs, else the family's paper recipe (README);
given flags win. With --model or --encoder the data path defaults to data/imagenet/train where that
folder exists. Step s's noise is drawn after reseeding with (seed, s, rank) and the data order is
seeded by (seed, epoch), so a resumed run repeats the uninterrupted one (bit for bit when eager;
compiled kernels vary in the last bits).
"""
import argparse
import copy
import glob
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

import align
import encoders
import kernels
from data import (NUM_GENERATED_CLASSES, Batches, check_at_least, generated_images,
                  load_checkpoint, posterior, prepared_arrays, prepared_folder, readable_checkpoint,
                  save_checkpoint, save_grid, setup_device, trim_log)
from model import build_model, in_latent_space, models, noise_std
from sample import generate

# -----------------------------------------------------------------------------
# The training objective: denoising loss (SiT or JiT) + coeff * REPA/iREPA alignment


class Objective(nn.Module):
    """Holds the network and the projector, so DDP and torch.compile see one module. mean_flow: the
    MeanFlow settings (train.py's --mf-* flags) where --objective meanflow, else None."""

    def __init__(self, net, projector, family, align_depth, gamma, coeff, noise_scale=1.0,
                 mean_flow=None):
        super().__init__()
        self.net, self.proj, self.family, self.mf = net, projector, family, mean_flow
        self.align_depth, self.gamma, self.coeff = align_depth, gamma, coeff
        self.noise_scale = noise_scale

    def forward(self, x, y, target):
        # x: clean inputs (B, C, H, W), y: labels (B,), target: encoder tokens (B, T, Dz) or None
        B, depth = x.shape[0], self.align_depth if self.proj is not None else None
        if self.mf is not None:  # MeanFlow on SiT's path (below); logged: its mean squared error
            t, r = self.mean_flow_times(torch.randn(2, B, device=x.device))
            loss, denoise, hidden, _ = self.mean_flow_loss(x, y, t, r, torch.randn_like(x))
        elif self.family == "SiT":  # linear interpolant, t=0 data, t=1 noise, v-prediction
            t = torch.rand(B, device=x.device)
            eps = torch.randn_like(x)
            tt = t.view(-1, 1, 1, 1)
            out, hidden = self.net((1 - tt) * x + tt * eps, t, y, depth)
            loss = denoise = ((out.float() - (eps - x)) ** 2).mean(dim=(1, 2, 3)).mean()
        else:  # JiT: t ~ logit-normal(-0.8, 0.8), t=1 data, x-prediction, loss on velocity
            t = torch.sigmoid(torch.randn(B, device=x.device) * 0.8 - 0.8)
            tt = t.view(-1, 1, 1, 1)
            z = tt * x + (1 - tt) * torch.randn_like(x) * self.noise_scale
            out, hidden = self.net(z, t, y, depth)
            v = (x - z) / (1 - tt).clamp_min(0.05)
            v_pred = (out.float() - z) / (1 - tt).clamp_min(0.05)
            loss = denoise = ((v - v_pred) ** 2).mean(dim=(1, 2, 3)).mean()
        if self.proj is None:
            return loss, denoise, torch.zeros_like(denoise)
        rep = align.alignment_loss(self.proj, hidden, target, self.gamma)
        return loss + self.coeff * rep, denoise, rep

    def mean_flow_times(self, n):
        """(t, r) from standard normals n (2, B): both logit-normal, t >= r, and r = t but in the
        batch's last --mf-ratio (the official code keeps r = t in the first int(0.75 B) rows)."""
        mean, std = self.mf.mf_time
        t, r = torch.sigmoid(n * std + mean).sort(dim=0, descending=True).values
        same = torch.arange(n.shape[1], device=n.device) < int(n.shape[1] * (1 - self.mf.mf_ratio))
        return t, torch.where(same, t, r)

    def mean_flow_loss(self, x, y, t, r, e):
        """MeanFlow (Geng et al. 2025): the network is the average velocity u(z_t, r, t) of the path
        from t back to r. The true u satisfies u = v - (t - r) du/dt (the MeanFlow identity): the loss
        regresses u on that target with its gradient stopped.
        Returns (weighted loss, mean squared error, hidden tokens, target)."""
        null, mf = self.net.num_classes, self.mf
        tt = t.view(-1, 1, 1, 1)
        z, v = (1 - tt) * x + tt * e, e - x  # SiT's path: t=0 data, t=1 noise; (B, C, H, W)
        if mf.mf_omega != 1 or mf.mf_kappa != 0:  # guidance in training (MeanFlow eq. 13-19):
            with torch.no_grad():                 # a guided velocity, so sampling needs no CFG
                on = ((t >= mf.mf_interval[0]) & (t <= mf.mf_interval[1])).view(-1, 1, 1, 1)
                omega = torch.where(on, mf.mf_omega, 1.0)
                kappa = torch.where(on, mf.mf_kappa, 0.0)
                labels = torch.cat([torch.full_like(y, null), y])
                both = self.net(torch.cat([z, z]), torch.cat([t, t]), labels)[0]  # (2B, C, H, W)
                v_null, v_cond = both.float().chunk(2)
                v_g = omega * v + (1 - omega - kappa) * v_null + kappa * v_cond
            v = torch.where((y == null).view(-1, 1, 1, 1), v, v_g)  # label-dropped rows keep plain v

        def u_fn(z, t, r):  # u(z_t, r, t): the network's second time input is the interval h = t - r
            return self.net(z, t, y, self.align_depth, h=t - r)  # (B, C, H, W), aux: hidden (B, T, D)
        # u and du/dt, its total derivative along the path, from one forward-mode product with
        # tangents (v, 1, 0) for (z_t, t, r). Flash attention has no forward-mode rule: math attention
        # here. Cloned primals: the compiler refuses views (t, r) as jvp inputs.
        with sdpa_kernel(SDPBackend.MATH):
            u, du_dt, hidden = torch.func.jvp(u_fn, (z.clone(), t.clone(), r.clone()),
                                              (v, torch.ones_like(t), torch.zeros_like(r)), has_aux=True)
        target = v - (tt - r.view(-1, 1, 1, 1)).clamp(0, 1) * du_dt.detach().float()  # stop-gradient
        err = ((u.float() - target) ** 2).sum(dim=(1, 2, 3))  # (B,)
        p, c = mf.mf_weight                                   # adaptive weight 1 / sg(err + c)^p
        return (err / (err.detach() + c) ** p).mean(), err.mean() / x[0].numel(), hidden, target

# -----------------------------------------------------------------------------
# Configuration: presets per recipe, explicit flags win


PRESETS = {
    "demo": dict(model="JiT-demo/16", image_size=64, batch_size=64, lr=1e-3, steps=1000, log_every=50,
                 ckpt_every=500, sample_every=500, warmup_steps=50, ema="0.99,0.98"),  # short run: short EMAs
    "meanflow-demo": dict(model="SiT-demo/4", image_size=32, batch_size=32, lr=2e-3, steps=1000, log_every=50,
                          ckpt_every=500, sample_every=500, warmup_steps=50, ema="0.99,0.98"),
    "SiT": dict(model="SiT-B/2", image_size=256, batch_size=256, lr=1e-4, steps=400_000, log_every=100,
                ckpt_every=50_000, sample_every=10_000, warmup_steps=0, ema="0.9999"),
    "JiT": dict(model="JiT-B/16", image_size=256, batch_size=1024, lr=None, steps=250_000, log_every=100,
                ckpt_every=50_000, sample_every=10_000, warmup_steps=None, ema="0.9999,0.9996"),
}
IMAGENET = os.path.join("data", "imagenet", "train")  # the official repositories' layout, found without --data-path
# a resume continues a run as it was: these define its model, method and data order (others may change, said)
FIXED_ON_RESUME = ("model", "objective", "image_size", "num_classes", "encoder", "irepa", "proj", "encoder_depth",
                   "vae_stats", "ema", "batch_size", "seed", "num_generated")
PEAK_FLOPS = 800e12  # MFU's denominator: a practical H100 bf16 rate (its dense datasheet peak: 989e12; docs)
FAMILY = {  # the parts of each recipe that are not flags (README, "Training")
    "SiT": dict(betas=(0.9, 0.999), clip=1.0, flip=False),
    "JiT": dict(betas=(0.9, 0.95), clip=None, flip=True),
    "MeanFlow": dict(betas=(0.9, 0.95), clip=None, flip=False),  # the official MeanFlow code's AdamW, no clipping
}


def get_args(argv=None):
    # allow_abbrev=False: on --resume only the flags given verbatim override the checkpoint's (see `given`)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", help="SiT-{S,B,L,XL}/{2,4,8}, JiT-{B,L,H}/{16,32} or JiT-demo/16 (default: SiT-B/2, "
                   "or the demo when no --data-path)")
    p.add_argument("--objective", choices=["flow", "meanflow"], default="flow", help="flow: the family's own "
                   "(SiT velocity, JiT clean image); meanflow: MeanFlow's average velocity, 1-step sampling (SiT "
                   "only; without --model and a data path, the pixel-space SiT-demo/4)")
    p.add_argument("--mf-time", type=float, nargs=2, default=(-0.4, 1.0), metavar=("MEAN", "STD"),
                   help="MeanFlow: t and r are logit-normal(MEAN, STD) (MeanFlow paper, Table 4: -0.4 1.0)")
    p.add_argument("--mf-ratio", type=float, default=0.25, help="MeanFlow: fraction of pairs with r != t "
                   "(Table 4: 25%%; the rest train the instantaneous velocity)")
    p.add_argument("--mf-omega", type=float, default=1.0, help="MeanFlow guidance in training: omega (Table 4 "
                   "and the official code: 1.0; effective scale omega / (1 - kappa) = 2.0); omega 1, kappa 0: none")
    p.add_argument("--mf-kappa", type=float, default=0.5, help="MeanFlow guidance in training: kappa (0.5)")
    p.add_argument("--mf-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LOW", "HIGH"),
                   help="MeanFlow: guidance where LOW <= t <= HIGH (Table 4 for B/2: 0 1)")
    p.add_argument("--mf-weight", type=float, nargs=2, default=(1.0, 1e-3), metavar=("P", "C"),
                   help="MeanFlow: adaptive loss weight 1 / (error + C)^P (paper: p=1, c=1e-3; the JAX code's "
                   "default C: 0.01)")
    p.add_argument("--encoder", default="none", help="target encoder name (encoders.py) or 'none' for no alignment")
    p.add_argument("--encoder-weights", help="a local file, 'random' (tests) or, by default, timm's download")
    p.add_argument("--vae-weights", help="SD-VAE (SiT): a local diffusers safetensors file, or 'random'; "
                   "default: stabilityai/sd-vae-ft-mse from the HF hub")
    p.add_argument("--vae-stats", help="SiT: per-channel latent statistics file (iREPA/REPA-E); default scale 0.18215")
    p.add_argument("--irepa", action="store_true", help="iREPA: conv projector + spatial norm, family's paper defaults")
    p.add_argument("--proj", choices=["mlp", "conv"], help="projector (default: mlp, conv with --irepa)")
    p.add_argument("--spnorm-gamma", type=float, help="spatial-norm gamma of the target tokens (default: none, "
                   "0.6 SiT / 0.8 JiT with --irepa; a negative value disables it)")
    p.add_argument("--proj-coeff", type=float, help="weight of the alignment loss (default: the paper's)")
    p.add_argument("--encoder-depth", type=int, help="align tokens after block N (default: 4 for S/B, 8 for L/XL/H)")
    p.add_argument("--data-path", help="ImageNet-style class folders, prepared once into --prepared-dir (default: "
                   f"{IMAGENET} if it exists and --model or --encoder is given, else generated shapes)")
    p.add_argument("--prepared-dir", help="where prepared arrays live (default: <out-dir>/../prepared-<name>-<size>[-<vae>])")
    p.add_argument("--num-classes", type=int, help="default: 1000 with --data-path, 10 for generated data")
    p.add_argument("--num-generated", type=int, default=2000, help="size of the generated dataset")
    p.add_argument("--batch-size", type=int, help="global batch size, split over ranks")
    p.add_argument("--lr", type=float, help="learning rate (JiT default: 5e-5 * batch / 256)")
    p.add_argument("--warmup-steps", type=int, help="linear warmup (JiT default: 5 epochs, SiT: none)")
    p.add_argument("--ema", help="EMA decay(s), comma-separated; samples use the first (SiT 0.9999; JiT 0.9999,0.9996)")
    p.add_argument("--steps", type=int, help="total optimisation steps")
    p.add_argument("--ckpt-every", type=int, help="checkpoint every N steps (and at the end)")
    p.add_argument("--sample-every", type=int, help="EMA sample grid every N steps and at the end (0: never)")
    p.add_argument("--log-every", type=int, help="reduce, print and log every N steps")
    p.add_argument("--out-dir", help="run directory (default: out/<model>-<encoder>-<none|repa|irepa>)")
    p.add_argument("--start-over", action="store_true", help="a fresh run in an --out-dir that holds one: move the "
                   "old run aside to <out-dir>.old-<time> first (without it, such a run is refused)")
    p.add_argument("--resume", help="a run directory (latest checkpoint) or a checkpoint file")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the step and the "
                   "encoder (default: on GPU, 1.5x the eager speed; off on CPU, where compiling takes minutes)")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--image-size", type=int, help="image side in pixels; the token grid follows it")
    p.add_argument("--seed", type=int, default=0, help="global seed")
    p.add_argument("--num-workers", type=int, default=4, help="data loader processes per rank")
    p.add_argument("--recompute", type=int, default=0, help="activation checkpointing of the first N blocks: "
                   "less memory (e.g. SiT-XL/2 at batch 256 per H100), more compute")
    p.add_argument("--bench", type=int, default=0, help="time N steps: img/s, MFU, memory, a kernel profile")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    check_at_least(p, args, ("batch_size", "steps", "log_every", "ckpt_every", "num_generated", "image_size",
                             "num_classes", "encoder_depth"))
    check_at_least(p, args, ("sample_every", "warmup_steps"), least=0)
    try:
        bad_ema = args.ema is not None and not (len(args.ema.split(",")) <= 2
                                                and all(0 <= float(d) < 1 for d in args.ema.split(",")))
    except ValueError:
        bad_ema = True
    if bad_ema:  # checkpoints keep two EMAs at most
        p.error(f"--ema {args.ema}: give one or two decays in [0, 1), comma-separated")
    if args.out_dir and os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        p.error(f"--out-dir {args.out_dir} is a file")
    for bad, what in [(not 0 <= args.mf_ratio <= 1, "--mf-ratio: give a fraction in [0, 1]"),
                      (args.mf_interval[0] > args.mf_interval[1], "--mf-interval: LOW is above HIGH"),
                      (args.mf_time[1] <= 0 or min(args.mf_weight) < 0, "--mf-time STD must be positive and "
                       "--mf-weight P, C not negative")]:
        if bad:
            p.error(what)
    given = {a.dest for a in p._actions if any(s == o or s.startswith(o + "=") for s in argv for o in a.option_strings)}
    if args.resume and args.bench:
        p.error("--resume continues a run as it was: it takes no --bench")
    if args.resume:  # the checkpoint's configuration, then the flags given now
        try:
            path, ck = readable_checkpoint(args.resume)
        except (FileNotFoundError, ValueError) as e:
            p.error(f"--resume: {e}")
        saved = ck["args"]
        for k in given & set(FIXED_ON_RESUME):  # a run from before a flag existed had its default
            if getattr(args, k) != saved.get(k, p.get_default(k)):
                p.error(f"--resume continues a run as it was, but --{k.replace('_', '-')} {getattr(args, k)} "
                        f"differs from the run's {saved.get(k, p.get_default(k))}: drop the flag, or start a new run")
        for k, v in saved.items():
            if k not in given:
                setattr(args, k, v)
            elif k not in ("resume", "start_over") and v != getattr(args, k) and os.environ.get("RANK", "0") == "0":
                print(f"resume changes --{k.replace('_', '-')}: {v} -> {getattr(args, k)}")
        if "out_dir" not in given and os.path.basename(os.path.dirname(path)) == "checkpoints":
            args.out_dir = os.path.dirname(os.path.dirname(path))  # the run continues where its checkpoint is
        if ck["step"] >= args.steps:
            p.error(f"--resume {path} is at step {ck['step']} already: pass --steps above it to go on")
        args.resume = path
    else:  # a new run: the recipe's preset, then the method's and family's defaults, for each flag not given
        if args.data_path is None and given & {"model", "encoder"} and "num_generated" not in given \
                and os.path.isdir(IMAGENET):  # the used-by command, where the official layout holds ImageNet
            args.data_path = IMAGENET
        preset = "JiT" if (args.model or "").startswith("JiT") else "SiT"
        if args.model is None and args.data_path is None:  # the offline demo: JiT, or MeanFlow's pixel SiT
            preset = "meanflow-demo" if args.objective == "meanflow" else "demo"
        for k, v in PRESETS[preset].items():
            if getattr(args, k) is None:
                setattr(args, k, v)
        if args.model not in models:  # before anything parses the name (a resumed run's model is a valid one)
            p.error(f"unknown model {args.model!r}; choose one of: {', '.join(models)}")
        if args.objective == "meanflow" and not args.model.startswith("SiT"):
            p.error(f"--objective meanflow trains SiT models, not {args.model}: pass --model SiT-B/2 (or another)")
        fam = "JiT" if args.model.startswith("JiT") else "SiT"
        method = align.IREPA[fam] if args.irepa else align.REPA[fam]
        args.proj = args.proj or method["proj"]
        args.spnorm_gamma = method["gamma"] if args.spnorm_gamma is None else args.spnorm_gamma
        args.proj_coeff = method["coeff"] if args.proj_coeff is None else args.proj_coeff
        args.encoder_depth = args.encoder_depth or align.encoder_depth_default(args.model)
        args.num_classes = args.num_classes or (1000 if args.data_path else NUM_GENERATED_CLASSES)
        args.lr = 5e-5 * args.batch_size / 256 if args.lr is None else args.lr
        args.precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
        args.compile = torch.cuda.is_available() if args.compile is None else args.compile
        method = "" if args.encoder == "none" else "-irepa" if args.irepa else "-repa"  # runs of both never mix
        method += "-meanflow" if args.objective == "meanflow" else ""
        args.out_dir = args.out_dir or os.path.join("out", f"{args.model.replace('/', '-')}-{args.encoder}{method}")
    args.spnorm_gamma = None if args.spnorm_gamma is not None and args.spnorm_gamma < 0 else args.spnorm_gamma
    if args.objective == "meanflow" and args.precision == "bf16" and not args.compile and torch.cuda.is_available():
        p.error("--objective meanflow --no-compile on a GPU: torch's eager bf16 attention backward fails under "
                "torch.func.jvp (torch 2.11); keep --compile (the default) or pass --precision fp32")
    if args.objective == "meanflow" and args.recompute:
        p.error("--recompute with --objective meanflow: activation checkpoints cannot replay the jvp's tangents; "
                "drop --recompute (SiT-B/2 MeanFlow at batch 256 takes 32 GiB)")
    return args

# -----------------------------------------------------------------------------
# Set-up steps, in the order main() calls them


def vae_name(args):
    """The VAE whose latents SiT's prepared arrays hold: a file (absolute path), "random" or the hub's; JiT: None."""
    vae = args.vae_weights or "stabilityai/sd-vae-ft-mse" if in_latent_space(args.model) else None
    return os.path.abspath(vae) if vae and os.path.isfile(vae) else vae


def check_run(args, world):
    """Every refusal that needs no built module: a run that cannot go stops before loading, preparing or writing."""
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by the world size {world}")
    if args.data_path and not os.path.isdir(args.data_path):
        raise SystemExit(f"--data-path {args.data_path} does not exist")
    token_px = int(args.model.split("/")[-1]) * (8 if in_latent_space(args.model) else 1)  # VAE factor x patch
    if args.image_size % token_px:
        raise SystemExit(f"--image-size {args.image_size} is not a multiple of {token_px}, the pixels per "
                         f"token of {args.model}")
    if args.encoder != "none":
        if args.encoder not in encoders.ENCODERS:
            raise SystemExit(f"unknown encoder {args.encoder!r}; choose one of: {', '.join(encoders.ENCODERS)}")
        grid = args.image_size // token_px
        if grid != args.image_size // 16:
            raise SystemExit(f"{args.model} at {args.image_size} px has a {grid}x{grid} token grid but "
                             f"{args.encoder} gives {args.image_size // 16}x{args.image_size // 16} tokens: "
                             "use a model with 16-pixel tokens (SiT-*/2, JiT-*/16) or --encoder none")
        with torch.device("meta"):  # the network's shape, without allocating its weights
            blocks = len(build_model(args.model, args.image_size, args.num_classes).blocks)
        if args.encoder_depth > blocks:
            raise SystemExit(f"--encoder-depth {args.encoder_depth}: {args.model} has {blocks} blocks")
    old = [f for f in ("checkpoints", "log.jsonl") if os.path.exists(os.path.join(args.out_dir, f))]
    if old and not args.resume and not args.bench and not args.start_over:  # a run folder belongs to one run
        raise SystemExit(f"--out-dir {args.out_dir} holds a run already ({' and '.join(old)}): continue it with "
                         f"--resume {args.out_dir}, choose another --out-dir, or pass --start-over to move it aside")
    if args.data_path:  # arrays prepared before must hold this data set, at this size, with this VAE's latents
        try:  # the folder goes into the checkpoints' args
            args.prepared_dir = prepared_folder(args.data_path, args.image_size, vae_name(args), args.out_dir,
                                                args.prepared_dir)
        except ValueError as e:
            raise SystemExit(str(e)) from None


def build(args, device):
    """(network, frozen target encoder, projector, SD-VAE) on the device: encoder and projector are None without
    alignment, the VAE None for JiT. The same initial weights on every rank and every rerun."""
    torch.manual_seed(args.seed)
    net = build_model(args.model, args.image_size, args.num_classes, args.objective == "meanflow").to(device)
    encoder = projector = vae = None
    try:  # missing weights: the loaders' one-line message (file and flag), not a traceback
        if args.encoder != "none":
            encoder = encoders.load_encoder(args.encoder, args.image_size, weights=args.encoder_weights).to(device)
            projector = align.make_projector(net.hidden_size, encoder.embed_dim, args.proj == "conv").to(device)
        if in_latent_space(args.model):
            vae = encoders.load_vae(args.vae_weights, args.vae_stats).to(device)
    except (RuntimeError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None
    if device.type == "cuda":  # the GPU fast paths (kernels.py): same functions, same parameter names
        net = kernels.enable(net)
        encoder = kernels.enable(encoder) if encoder is not None else None
    return net, encoder, projector, vae


def resume_state(args, net, emas, projector, opt, rank):
    """Loads --resume's network, EMA(s), projector and optimiser into the built ones, or refuses a checkpoint
    that does not fit them; cuts the run's log back to the checkpoint. Returns the checkpoint's step."""
    ck = load_checkpoint(args.resume)
    try:  # the run's settings (get_args) build these: only a checkpoint of other code can fail here
        net.load_state_dict(ck["model"])
        for ema, key in zip(emas, ("ema", "ema2")):
            ema.load_state_dict(ck[key])
        if projector is not None:
            projector.load_state_dict(ck["proj"])
        opt.load_state_dict(ck["opt"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise SystemExit(f"--resume {args.resume} does not fit the network its settings build: {str(e)[:600]}")
    if rank == 0 and os.path.exists(os.path.join(args.out_dir, "log.jsonl")):
        trim_log(os.path.join(args.out_dir, "log.jsonl"), ck["step"])
    return ck["step"]


def load_data(args, flip, vae, device, rank, world):
    """The training set as Batches: --data-path's arrays (rank 0 prepares them on first use), else generated
    shapes (SiT: with their VAE posterior, computed once)."""
    if args.data_path:  # check_run found the folder
        images, labels, latents = prepared_arrays(args.data_path, args.prepared_dir, args.image_size, vae,
                                                  vae_name(args), device, rank, world)
        if labels.max() >= args.num_classes:
            raise SystemExit(f"{args.prepared_dir} has {labels.max() + 1} classes but --num-classes is "
                             f"{args.num_classes}")
    else:
        images, labels = generated_images(args.num_generated, args.image_size, seed=1234)
        images, labels, latents = images.numpy(), labels.numpy(), None
        if vae is not None:
            r = args.image_size // 8
            latents = posterior(vae, images, np.empty((len(images), 8, r, r), np.float32), device)
    return Batches(images, labels, latents, args.batch_size, rank, world, args.seed, flip)


def open_run(args, num_params, step, rank, world, device, writes):
    """Says what runs (rank 0), then readies the run folder (the writing rank): --start-over moves
    an old run aside first, never deleting it."""
    if rank == 0:
        print(json.dumps(vars(args), indent=1, default=str))
        print(f"{args.model}: {num_params:,} trainable parameters (incl. projector), {world} "
              f"rank(s), device {device}")
        print(f"resuming from {args.resume} at step {step}" if args.resume else
              f"a new run in {args.out_dir}")
        print(f"data: {args.data_path} (prepared in {args.prepared_dir})" if args.data_path else
              f"data: {args.model} trains on {args.num_generated} generated shapes, the offline "
              f"demo's data (no --data-path, no {IMAGENET}); for the paper's run pass "
              "--data-path /imagenet/train")
        if args.compile:
            print("compiling the training step and the encoder: the first steps take a minute or two")
    if writes and args.start_over and not args.resume and os.path.exists(args.out_dir):
        aside = f"{os.path.normpath(args.out_dir)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(args.out_dir, aside)
        print(f"--start-over: moved the old run in {args.out_dir} to {aside}")
    if writes:
        os.makedirs(args.out_dir, exist_ok=True)


class Bench:
    """--bench N: 5 warm-up (and compile) steps, N timed ones, then 3 under the profiler (rank 0); report() prints
    the kernel table and the BENCH line bench.sh reads. A benchmark writes nothing (main's `writes`)."""

    def __init__(self, args, device, rank, world):
        args.steps = args.log_every = 8 + args.bench
        self.args, self.device, self.rank, self.world, self.clock = args, device, rank, world, {}

    def step(self, step):  # after each training step: the clock at steps 5 and 5 + N, then the profiler
        if step in (5, 5 + self.args.bench):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.clock[step] = time.time()
            if step > 5 and self.rank == 0:
                self.prof = torch.profiler.profile()
                self.prof.start()

    def report(self, flops_per_img):
        if self.rank != 0:
            return
        self.prof.stop()
        print(self.prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=90))
        a, flops = self.args, flops_per_img or float("nan")
        ips = a.bench * a.batch_size / (self.clock[5 + a.bench] - self.clock[5]) / self.world
        mem = torch.cuda.max_memory_allocated() / 2 ** 30 if self.device.type == "cuda" else float("nan")
        print(f"BENCH {a.model} enc={a.encoder} proj={a.proj} batch={a.batch_size} world={self.world} "
              f"compile={a.compile} {a.precision}: {ips:.1f} img/s per GPU, MFU {ips * flops / PEAK_FLOPS:.1%}, "
              f"peak memory {mem:.1f} GiB, {flops / 1e9:.0f} GFLOP/img")


def count_flops(objective, encoder, data, device, amp, vae):
    """Training FLOPs per image (network forward+backward, encoder forward), counted by torch on 2 images."""
    from torch.utils.flop_counter import FlopCounterMode
    x, y, lat = data[0]
    x, y = x[:2].to(device), y[:2].to(device)
    inp = vae.scale(lat[:2].to(device).chunk(2, 1)[0]) if vae is not None else x.float() / 127.5 - 1
    with FlopCounterMode(display=False) as fc:
        target = encoder(x) if encoder is not None else None  # in fp32: the counter skips bf16's fused GELU product
        with amp:
            objective(inp, y, target)[0].backward()
    objective.zero_grad(set_to_none=True)
    return fc.get_total_flops() / 2


def sample_grid(ema, family, vae, args, step, device):
    """A grid from the EMA network in eval mode: one row of each class (at most 8 classes x 8)."""
    y = torch.arange(min(args.num_classes, 8), device=device).repeat_interleave(8)
    path = os.path.join(args.out_dir, "samples", f"{step:07d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode, steps = ("meanflow", 1) if args.objective == "meanflow" else ("heun" if family == "JiT" else "ode", 50)
    tqdm.write(f"sampling {len(y)} images from the EMA for {path} ({steps} steps)")
    gen = torch.Generator(device).manual_seed(args.seed)
    ema.eval()
    imgs = generate(ema, y, family.lower(), vae, mode=mode, num_steps=steps,
                    noise_scale=noise_std(family, args.image_size), generator=gen)
    save_grid(imgs, path)


def check_replicas(objective, rank, world):
    """DDP: every replica must hold the same weights; compares per-tensor checksums across ranks."""
    sums = torch.stack([p.detach().double().sum() for p in objective.parameters()])
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, dist.ReduceOp.MIN)
    dist.all_reduce(hi, dist.ReduceOp.MAX)
    if rank == 0:
        print(f"replicas identical across {world} ranks: {bool(torch.equal(lo, hi))}")

# -----------------------------------------------------------------------------
# Main: set-up, then the training loop


def main(argv=None):
    args = get_args(argv)
    device, rank, world = setup_device()
    ddp, family = world > 1, "JiT" if args.model.startswith("JiT") else "SiT"
    fam = FAMILY["MeanFlow" if args.objective == "meanflow" else family]
    check_run(args, world)
    net, encoder, projector, vae = build(args, device)

    # ---- objective, EMA(s), optimiser; a resumed run's state is loaded (or refused) before data work
    mean_flow = args if args.objective == "meanflow" else None
    objective = Objective(net, projector, family, args.encoder_depth, args.spnorm_gamma,
                          args.proj_coeff, noise_std(family, args.image_size), mean_flow)
    decays = [float(d) for d in args.ema.split(",")]
    emas = [copy.deepcopy(net).requires_grad_(False) for _ in decays]
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=fam["betas"], weight_decay=0.0,
                            fused=device.type == "cuda")
    step = resume_state(args, net, emas, projector, opt, rank) if args.resume else 0
    data = load_data(args, fam["flip"], vae, device, rank, world)
    warmup = 5 * (data.n // args.batch_size) if args.warmup_steps is None else args.warmup_steps
    bench = Bench(args, device, rank, world) if args.bench else None  # sets --steps, --log-every
    writes = rank == 0 and not args.bench  # the one process that writes log, samples, checkpoints

    # ---- DDP and compilation
    train_obj = objective
    if ddp:
        train_obj = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device] if device.type == "cuda" else None,
            gradient_as_bucket_view=True)
    if ddp and args.compile:  # one graph: overlapping NCCL with the backward costs more than it hides
        torch._dynamo.config.optimize_ddp = False
    step_fn = torch.compile(train_obj) if args.compile else train_obj
    encode = torch.compile(encoder) if args.compile and encoder is not None else encoder
    trainable = [p for p in net.parameters() if p.requires_grad]  # frozen pos-embed: not in the EMA
    ema_params = [[e for e, p in zip(ema.parameters(), net.parameters()) if p.requires_grad]
                  for ema in emas]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    open_run(args, sum(p.numel() for p in params), step, rank, world, device, writes)
    workers = args.num_workers if device.type == "cuda" else 0  # CPU runs: no worker start-up cost
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(step, args.steps),
                                         num_workers=workers, prefetch_factor=4 if workers else None,
                                         pin_memory=device.type == "cuda")
    flops_per_img = None
    if device.type == "cuda":
        flops_per_img = count_flops(objective, encoder, data, device, amp, vae)
    net.recompute = args.recompute  # after counting: MFU counts useful FLOPs, not recomputed ones
    acc = torch.zeros(4, device=device)  # sums of loss, denoise, repa, grad norm since the last log
    t0, last_log = time.time(), step
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, desc="train")
    for x, y, lat in loader:  # x uint8 (B, 3, R, R), y (B,), lat (SiT): mean|std (B, 8, R/8, R/8)
        torch.manual_seed(args.seed * 1_000_003 + step * world + rank)  # step s's noise: resumable
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad(), amp:  # autocast leaves the elementwise ops on the inputs in fp32
            target = encode(x) if encoder is not None else None  # (B, T, Dz) from uint8 images
            if vae is not None:  # SiT on SD-VAE latents, the posterior re-sampled every step
                mean, std = lat.to(device, non_blocking=True).chunk(2, dim=1)
                inp = vae.scale(mean + std * torch.randn_like(mean))
            else:
                inp = x.float() / 127.5 - 1
            drop = torch.rand(y.shape, device=device) < 0.1  # label dropout for CFG: the null class
            y = torch.where(drop, args.num_classes, y)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / warmup) if warmup else args.lr
        with amp:
            loss, denoise, rep = step_fn(inp, y, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if fam["clip"]:
            gnorm = torch.nn.utils.clip_grad_norm_(params, fam["clip"])
        else:  # no clipping (JiT, MeanFlow): the norm alone, for the log
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        opt.step()
        with torch.no_grad():
            for ema_p, decay in zip(ema_params, decays):
                torch._foreach_lerp_(ema_p, trainable, 1 - decay)
            acc += torch.stack([loss.detach(), denoise.detach(), rep.detach(), gnorm]).float()
        step += 1
        bar.update(1)
        if bench:
            bench.step(step)
        if step % args.log_every == 0 or step % args.ckpt_every == 0 or step == args.steps:
            if ddp:  # logged before any checkpoint, so that a NaN is never saved
                dist.all_reduce(acc)
            loss_avg, den_avg, rep_avg, g_avg = (acc / world / (step - last_log)).tolist()
            if not math.isfinite(loss_avg):
                good = sorted(glob.glob(os.path.join(args.out_dir, "checkpoints", "*.pt")))
                raise SystemExit(f"loss is {loss_avg} around step {step}: stopping; last good "
                                 f"checkpoint: {(good or ['none'])[-1]}")
            ips = (step - last_log) * args.batch_size / (time.time() - t0) / world
            rec = dict(step=step, loss=loss_avg, denoise=den_avg, repa=rep_avg, grad_norm=g_avg,
                       lr=opt.param_groups[0]["lr"], img_s_per_gpu=ips)
            if flops_per_img:
                rec["mfu"] = ips * flops_per_img / PEAK_FLOPS
            bar.set_postfix(loss=f"{loss_avg:.4f}", repa=f"{rep_avg:.3f}", ips=f"{ips:.0f}")
            if writes:
                with open(os.path.join(args.out_dir, "log.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
            acc.zero_()
            t0, last_log = time.time(), step
        if writes and args.sample_every and (step % args.sample_every == 0 or step == args.steps):
            sample_grid(emas[0], family, vae, args, step, device)
        if step % args.ckpt_every == 0 or step == args.steps:
            if writes:
                state = dict(model=net.state_dict(), opt=opt.state_dict(), args=vars(args), step=step,
                             proj=projector.state_dict() if projector is not None else None)
                state.update({key: ema.state_dict() for key, ema in zip(("ema", "ema2"), emas)})
                save_checkpoint(state, os.path.join(args.out_dir, "checkpoints", f"{step:07d}.pt"))
            if ddp:
                dist.barrier()
    bar.close()
    if bench:
        bench.report(flops_per_img)
    if ddp:
        check_replicas(objective, rank, world)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
