"""
Train SiT (SD-VAE latents) or JiT (pixels) with REPA or iREPA, from a CPU demo to multi-node DDP.

    python train.py                                  # offline demo, generated data, CPU ok
    python train.py --encoder dinov2-vit-s --encoder-weights random --irepa   # iREPA, offline
    torchrun --nproc_per_node=8 train.py --encoder dinov2-vit-b --irepa --data-path /imagenet/train
    torchrun --nproc_per_node=8 train.py --model JiT-B/16 --encoder dinov2-vit-b --irepa ...
    python train.py --resume out/JiT-demo-16-none    # continue exactly where it stopped
    python train.py --objective meanflow             # MeanFlow's offline demo (pixel SiT)

Without --model, a data path or a pretrained --encoder the offline demo runs, else the family's
paper recipe (RECIPES), which needs data; given flags win. Step s's noise is seeded by (seed, s,
rank), the data order by (seed, epoch): a resumed run repeats the uninterrupted one (bit for bit
when eager). Ctrl-C checkpoints the step reached and prints the --resume command.
"""
import argparse
import copy
import glob
import json
import math
import os
import shlex
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

import align
import encoders
import kernels
import repae
from data import (NUM_GENERATED_CLASSES, Batches, Parser, at_least, generated_images,
                  posterior, prepared_arrays, read_weights, save_checkpoint, save_curves,
                  save_grid, setup_device)
from model import build_model, in_latent_space, models, noise_std
from runs import IMAGENET, catch_interrupt, check_run, open_run, resumed, rewind, vae_name
from sample import generate

# -----------------------------------------------------------------------------
# The objective: denoising loss (SiT or JiT) + coeff * REPA/iREPA alignment; MeanFlow's below


@dataclass(frozen=True)
class MeanFlow:
    """MeanFlow's settings, the --mf-* flags (defaults: the MeanFlow paper, Table 4)."""
    time: tuple = (-0.4, 1.0)     # t and r ~ logit-normal(mean, std)
    ratio: float = 0.25           # the fraction of pairs with r != t; the rest learn v
    omega: float = 1.0            # guidance in training (eq. 13-19); omega 1, kappa 0: none
    kappa: float = 0.5
    interval: tuple = (0.0, 1.0)  # guidance where low <= t <= high
    weight: tuple = (1.0, 1e-3)   # adaptive loss weight 1 / (err + c)^p, as (p, c)


class Objective(nn.Module):
    """The network and the projector as one module for DDP and torch.compile; mean_flow:
    MeanFlow's settings (--objective meanflow) or None."""

    def __init__(self, net, projector, *, family, align_depth, gamma, coeff, noise_scale=1.0,
                 mean_flow=None):
        super().__init__()
        self.net, self.proj, self.mf = net, projector, mean_flow
        self.family, self.align_depth, self.noise_scale = family, align_depth, noise_scale
        self.gamma, self.coeff = gamma, coeff

    def forward(self, x, y, target):
        # x: clean inputs (B, C, H, W), y: labels (B,), target: encoder tokens (B, T, Dz) or None
        B, depth = x.shape[0], self.align_depth if self.proj is not None else None
        if self.mf is not None:  # logged as denoise: MeanFlow's mean squared error
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
        """(t, r) from standard normals n (2, B): logit-normal, t >= r, and r = t but in the
        batch's last `ratio` (the official code keeps r = t in the first rows)."""
        mean, std = self.mf.time
        t, r = torch.sigmoid(n * std + mean).sort(dim=0, descending=True).values
        same = torch.arange(n.shape[1], device=n.device) < int(n.shape[1] * (1 - self.mf.ratio))
        return t, torch.where(same, t, r)

    def mean_flow_loss(self, x, y, t, r, e):
        """MeanFlow (Geng et al. 2025): the network is u(z_t, r, t), the average velocity from t
        back to r. The true u satisfies u = v - (t - r) du/dt, so u regresses on that target,
        its gradient stopped. Returns (weighted loss, mean squared error, hidden, target)."""
        null, mf = self.net.num_classes, self.mf
        tt = t.view(-1, 1, 1, 1)
        z, v = (1 - tt) * x + tt * e, e - x  # SiT's path: t=0 data, t=1 noise; (B, C, H, W)
        if mf.omega != 1 or mf.kappa != 0:  # guidance trained in, so sampling needs no CFG
            with torch.no_grad():
                on = ((t >= mf.interval[0]) & (t <= mf.interval[1])).view(-1, 1, 1, 1)
                omega = torch.where(on, mf.omega, 1.0)
                kappa = torch.where(on, mf.kappa, 0.0)
                labels = torch.cat([torch.full_like(y, null), y])
                both = self.net(torch.cat([z, z]), torch.cat([t, t]), labels)[0]  # (2B, C, H, W)
                v_null, v_cond = both.float().chunk(2)
                v_g = omega * v + (1 - omega - kappa) * v_null + kappa * v_cond
            v = torch.where((y == null).view(-1, 1, 1, 1), v, v_g)  # dropped labels: plain v

        def u_fn(z, t, r):  # the network's second time input is the interval h = t - r
            return self.net(z, t, y, self.align_depth, h=t - r)  # aux: hidden (B, T, D)
        # u and du/dt from one jvp, tangents (v, 1, 0) for (z_t, t, r); math attention: flash has
        # no forward-mode rule; clones: the compiler refuses views as jvp inputs
        with sdpa_kernel(SDPBackend.MATH):
            u, du_dt, hidden = torch.func.jvp(u_fn, (z.clone(), t.clone(), r.clone()),
                                              (v, torch.ones_like(t), torch.zeros_like(r)),
                                              has_aux=True)
        target = v - (tt - r.view(-1, 1, 1, 1)).clamp(0, 1) * du_dt.detach().float()
        err = ((u.float() - target) ** 2).sum(dim=(1, 2, 3))  # (B,)
        p, c = mf.weight
        return (err / (err.detach() + c) ** p).mean(), err.mean() / x[0].numel(), hidden, target

# -----------------------------------------------------------------------------
# Configuration: the recipes (README, "Recipes"), then the flags, which win

RECIPES = {  # flag defaults, then AdamW's betas, the gradient clip and random flips
    "SiT": dict(model="SiT-B/2", image_size=256, batch_size=256, lr=1e-4, warmup_steps=0,
                ema="0.9999", steps=400_000, betas=(0.9, 0.999), clip=1.0, flip=False),
    "JiT": dict(model="JiT-B/16", image_size=256, batch_size=1024, lr=None, warmup_steps=None,
                ema="0.9999,0.9996", steps=250_000, betas=(0.9, 0.95), clip=None, flip=True),
}  # JiT's lr None: 5e-5 * batch / 256; its warmup None: 5 epochs
RECIPES["MeanFlow"] = dict(RECIPES["SiT"], betas=(0.9, 0.95), clip=None)  # its official AdamW
SHORT = dict(steps=1000, warmup_steps=50, ema="0.99,0.98", log_every=50, ckpt_every=500,
             sample_every=500)  # the offline demos: short runs, short EMAs
RECIPES["demo"] = dict(RECIPES["JiT"], **SHORT, model="JiT-demo/16", image_size=64,
                       batch_size=64, lr=1e-3)
RECIPES["meanflow-demo"] = dict(RECIPES["MeanFlow"], **SHORT, model="SiT-demo/4",
                                image_size=32, batch_size=32, lr=2e-3)
def recipe_of(args):
    """The recipe a run trains with: MeanFlow's, else its family's."""
    return RECIPES["MeanFlow" if args.objective == "meanflow" else args.model[:3]]


def decays(text):
    """--ema's type: one or two decays in [0, 1) (checkpoints keep two EMAs)."""
    values = tuple(float(d) for d in text.split(","))
    if len(values) > 2 or not all(0 <= d < 1 for d in values):
        raise argparse.ArgumentTypeError(f"give one or two decays in [0, 1), got {text}")
    return values


def fraction(text):
    """--mf-ratio's type: a number in [0, 1]."""
    if not 0 <= float(text) <= 1:
        raise argparse.ArgumentTypeError(f"give a fraction in [0, 1], got {text}")
    return float(text)


def gamma(text):
    """--spnorm-gamma's type: a negative value switches the spatial norm off."""
    return None if float(text) < 0 else float(text)


def fresh_defaults(args):
    """A new run's flag defaults: its recipe's, then the method's and family's."""
    data_path = args.data_path
    if (data_path is None and (args.model or args.encoder != "none")
            and args.num_generated is None and os.path.isdir(IMAGENET)):
        data_path = IMAGENET
    mf = args.objective == "meanflow"
    # a paper model or a pretrained encoder means the paper's run: shapes only when asked for
    pretrained = args.encoder != "none" and args.encoder_weights != "random"
    if args.model is None and data_path is None and not pretrained:  # the offline demo
        recipe = RECIPES["meanflow-demo" if mf else "demo"]
    else:  # the paper's recipe (without --model: SiT's)
        recipe = RECIPES["MeanFlow" if mf else (args.model or "SiT")[:3]]
    model = args.model or recipe["model"]
    method = (align.IREPA if args.irepa else align.REPA)[model[:3]]
    shapes = 2000 if "demo" in model and not pretrained else None  # None: check_run refuses
    tag = "" if args.encoder == "none" else "-irepa" if args.irepa else "-repa"
    tag += "-repae" * args.repae
    lr = recipe["lr"] or 5e-5 * (args.batch_size or recipe["batch_size"]) / 256
    flags = {k: v for k, v in recipe.items() if k not in ("betas", "clip", "flip")}
    return dict(flags, data_path=data_path, num_generated=shapes, lr=lr, proj=method["proj"],
                spnorm_gamma=method["gamma"], proj_coeff=method["coeff"],
                encoder_depth=align.encoder_depth_default(model),
                num_classes=1000 if data_path else NUM_GENERATED_CLASSES, out_dir=os.path.join(
                    "out", f"{model.replace('/', '-')}-{args.encoder}{tag}{'-meanflow' * mf}"))


def get_args(argv=None):
    p = Parser(__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--model", choices=models, metavar="NAME", help="SiT-{S,B,L,XL}/{2,4,8}, "
        "JiT-{B,L,H}/{16,32}, JiT-demo/16 or SiT-demo/4 (default: the recipe's)")
    add("--objective", choices=["flow", "meanflow"], default="flow", help="flow: the family's "
        "loss; meanflow: MeanFlow's average velocity (SiT), sampled in one step")
    add("--mf-time", type=float, nargs=2, default=MeanFlow.time, metavar=("MEAN", "STD"),
        help="MeanFlow: t, r ~ logit-normal(MEAN, STD)")
    add("--mf-ratio", type=fraction, default=MeanFlow.ratio, help="MeanFlow: the share of r != t")
    add("--mf-omega", type=float, default=MeanFlow.omega, help="MeanFlow guidance: omega")
    add("--mf-kappa", type=float, default=MeanFlow.kappa, help="MeanFlow guidance: kappa")
    add("--mf-interval", type=float, nargs=2, default=MeanFlow.interval, metavar=("LOW", "HIGH"),
        help="MeanFlow: guidance where LOW <= t <= HIGH")
    add("--mf-weight", type=at_least(0.0, float), nargs=2, default=MeanFlow.weight,
        metavar=("P", "C"), help="MeanFlow: loss weight 1 / (error + C)^P (JAX code's C: 0.01)")
    add("--encoder", default="none", choices=["none", *encoders.ENCODERS], metavar="NAME",
        help="target encoder (encoders.py), or none: no alignment")
    add("--encoder-weights", help="a file, 'random' (tests) or, by default, timm's download")
    add("--vae-weights", help="SiT: an SD-VAE file (diffusers' or official) or 'random' "
        "(default: the hub's)")
    add("--vae-stats", help="SiT: a per-channel latent statistics file (default: 0.18215)")
    add("--irepa", action="store_true", help="iREPA: conv projector and spatial norm (align.py)")
    add("--proj", choices=["mlp", "conv"], help="projector (default: mlp; conv with --irepa)")
    add("--spnorm-gamma", type=gamma, help="spatial norm (default: align.py's; negative: off)")
    add("--proj-coeff", type=float, help="weight of the alignment loss (default: align.py's)")
    add("--encoder-depth", type=at_least(1), help="align after block N (default: 4 S/B, else 8)")
    add("--data-path", help=f"class folders (default for paper runs: {IMAGENET}, if there)")
    add("--prepared-dir", help="prepared arrays (default: beside the run folder)")
    add("--num-classes", type=at_least(1), help="default: 1000 with --data-path, else 10")
    add("--num-generated", type=at_least(1), help="generated images (default: 2000 in the demos)")
    add("--batch-size", type=at_least(1), help="global batch size, split over ranks")
    add("--lr", type=at_least(0.0, float), help="learning rate (JiT's default: 5e-5 * batch / 256)")
    add("--warmup-steps", type=at_least(0), help="linear warm-up (JiT's default: 5 epochs)")
    add("--ema", type=decays, help="one or two EMA decays, comma-separated")
    add("--steps", type=at_least(1), help="total optimisation steps")
    add("--log-every", type=at_least(1), default=100, help="log every N steps")
    add("--ckpt-every", type=at_least(1), default=50_000, help="checkpoint every N steps")
    add("--sample-every", type=at_least(0), default=10_000, help="sample grid every N (0: never)")
    add("--out-dir", help="run folder (default: out/MODEL-ENCODER[-METHOD][-repae][-meanflow])")
    new_or_old = p.add_mutually_exclusive_group().add_argument  # not two runs' settings mixed
    new_or_old("--start-over", action="store_true", help="move a run in --out-dir aside first")
    new_or_old("--resume", help="a run folder (its newest checkpoint) or a checkpoint")
    add("--wandb", metavar="PROJECT", help="also log to this Weights & Biases project")
    cuda = torch.cuda.is_available()
    add("--compile", action=argparse.BooleanOptionalAction, default=cuda,
        help="torch.compile the step and the encoder (default: on a GPU)")
    add("--cuda-graphs", action=argparse.BooleanOptionalAction, default=cuda,
        help="replay the step from a CUDA graph (kernels.py; default: on a GPU)")
    add("--precision", choices=["bf16", "fp32"], default="bf16" if cuda else "fp32",
        help="autocast dtype (default: bf16 on a GPU)")
    add("--image-size", type=at_least(1), help="image side in pixels")
    add("--seed", type=at_least(0), default=0, help="global seed")
    add("--num-workers", type=at_least(0), default=4, help="data loader processes per rank")
    repae.add_args(p)
    args = p.parse_args(argv)
    if args.resume:
        return resumed(p, argv, args.resume)
    p.set_defaults(**fresh_defaults(args))
    return p.parse_args(argv)

# -----------------------------------------------------------------------------
# Set-up, in the order main() calls it


def build(args, device):
    """(objective, encoder or None, SD-VAE or None, EMA network(s), AdamW), seeded."""
    torch.manual_seed(args.seed)
    net = build_model(args.model, args.image_size, args.num_classes, args.objective == "meanflow")
    net = net.to(device)
    encoder = projector = vae = None
    try:  # missing weights: the loaders' one-line message, not a traceback
        if args.encoder != "none":
            encoder = encoders.load_encoder(args.encoder, args.image_size,
                                            weights=args.encoder_weights).to(device)
            projector = align.make_projector(net.hidden_size, encoder.embed_dim,
                                             args.proj == "conv").to(device)
        if in_latent_space(args.model):
            vae = encoders.load_vae(args.vae_weights, args.vae_stats).to(device)
        if device.type == "cuda":  # the fast paths (kernels.py): same functions and parameters
            net = kernels.enable(net)
            encoder = kernels.enable(encoder) if encoder is not None else None
        if args.repae:  # REPA-E (repae.py): its stage holds the SiT's EMA and AdamW
            stage = repae.build(args, net, projector, vae)
            return stage, encoder, vae, [stage.ema_net], stage.opt
    except (RuntimeError, ValueError) as e:
        raise SystemExit(str(e)) from None
    mean_flow = None
    if args.objective == "meanflow":
        mean_flow = MeanFlow(time=args.mf_time, ratio=args.mf_ratio, omega=args.mf_omega,
                             kappa=args.mf_kappa, interval=args.mf_interval, weight=args.mf_weight)
    family = args.model[:3]
    objective = Objective(net, projector, family=family, align_depth=args.encoder_depth,
                          gamma=args.spnorm_gamma, coeff=args.proj_coeff, mean_flow=mean_flow,
                          noise_scale=noise_std(family, args.image_size))
    emas = [copy.deepcopy(net).requires_grad_(False) for _ in args.ema]
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=recipe_of(args)["betas"], weight_decay=0.0,
                            fused=device.type == "cuda")
    return objective, encoder, vae, emas, opt


def load_data(args, vae, device, rank, world, start):
    """This rank's batches of steps start..--steps: --data-path's arrays (prepared on first
    use) or generated shapes (SiT: with their VAE posterior; REPA-E: none)."""
    vae = None if args.repae else vae
    if args.data_path:
        images, labels, latents = prepared_arrays(args.data_path, args.prepared_dir,
                                                  args.image_size, vae, vae_name(args), device,
                                                  rank, world)
    else:
        images, labels = generated_images(args.num_generated, args.image_size, seed=1234)
        images, labels, latents = images.numpy(), labels.numpy(), None
        if vae is not None:
            r = args.image_size // 8
            latents = posterior(vae, images, np.empty((len(images), 8, r, r), np.float32), device)
    data = Batches(images, labels, latents, args.batch_size, rank, world, args.seed,
                   recipe_of(args)["flip"])
    workers = args.num_workers if device.type == "cuda" else 0  # CPU: no worker start-up
    return torch.utils.data.DataLoader(data, batch_size=None, sampler=range(start, args.steps),
                                       num_workers=workers, prefetch_factor=4 if workers else None,
                                       pin_memory=device.type == "cuda")


def make_step(args, objective, encoder, vae, emas, opt, device, world):
    """train_step(x, y, lat): one optimisation step on a loader batch; it returns (loss,
    denoise, repa, grad norm) as one tensor (REPA-E: repae.LOGGED), without a host sync."""
    net, params = objective.net, opt.param_groups[0]["params"]
    encode = torch.compile(encoder) if args.compile and encoder is not None else encoder
    graphs = args.cuda_graphs and device.type == "cuda"
    if graphs and (world > 1 or args.repae):  # not checked on a GPU yet
        graphs = False
        if os.environ.get("RANK", "0") == "0":  # said once
            print("--cuda-graphs: off under DDP and --repae for now")
    if args.repae:  # REPA-E: the stage's four phases on the images
        if args.compile:  # its networks in place (repae.py)
            objective.compile()
        def repae_step(x, y, lat):  # lat: None
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.no_grad(), objective.amp:
                target = encode(x)  # (B, T, Dz)
            return torch.stack(list(objective.step(x, y, target).values())).float()
        return repae_step
    model = objective
    if world > 1:  # compiled: one graph, as overlapping NCCL with the backward costs more
        torch._dynamo.config.optimize_ddp = False
        model = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device] if device.type == "cuda" else None,
            gradient_as_bucket_view=True)
    model = torch.compile(model) if args.compile else model
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    trainable = [p for p in net.parameters() if p.requires_grad]  # frozen pos-embed: no EMA
    ema_params = [[e for e, p in zip(ema.parameters(), net.parameters()) if p.requires_grad]
                  for ema in emas]
    null, clip = args.num_classes, recipe_of(args)["clip"]

    def train_step(x, y, lat):  # x uint8 (B, 3, R, R), y (B,), lat (SiT): mean|std (B, 8, r, r)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad(), amp:  # autocast leaves the elementwise ops on the inputs in fp32
            target = encode(x) if encode is not None else None  # (B, T, Dz)
            if vae is not None:  # SiT: the SD-VAE posterior re-sampled every step
                mean, std = lat.to(device, non_blocking=True).chunk(2, dim=1)
                inp = vae.scale(mean + std * torch.randn_like(mean))
            else:
                inp = x.float() / 127.5 - 1
            drop = torch.rand(y.shape, device=device) < 0.1  # label dropout for CFG
            y = torch.where(drop, null, y)
        with amp:
            loss, denoise, rep = model(inp, y, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
        else:  # no clipping (JiT, MeanFlow): the norm alone, for the log
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        opt.step()
        with torch.no_grad():
            for ema_p, decay in zip(ema_params, args.ema):
                torch._foreach_lerp_(ema_p, trainable, 1 - decay)
        return torch.stack([loss.detach(), denoise.detach(), rep.detach(), gnorm]).float()
    return kernels.GraphedStep(train_step, opt) if graphs else train_step


def sample_grid(ema, vae, args, step, device):
    """A grid from the EMA network in eval mode: a row of each class (at most 8 x 8)."""
    y = torch.arange(min(args.num_classes, 8), device=device).repeat_interleave(8)
    path = os.path.join(args.out_dir, "samples", f"{step:07d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    family = args.model[:3].lower()
    mode, steps = ("heun" if family == "jit" else "ode"), 50
    if args.objective == "meanflow":
        mode, steps = "meanflow", 1
    tqdm.write(f"sampling {len(y)} images from the EMA for {path} ({steps} steps)")
    gen = torch.Generator(device).manual_seed(args.seed)
    images = generate(ema.eval(), y, family, vae, mode=mode, num_steps=steps, generator=gen,
                      noise_scale=noise_std(family, args.image_size), progress=True)
    save_grid(images, path)

# -----------------------------------------------------------------------------
# Main: set-up, then the training loop


def main(argv=None):
    args = get_args(argv)
    device, rank, world = setup_device()
    check_run(args, world)
    objective, encoder, vae, emas, opt = build(args, device)
    step, log = 0, os.path.join(args.out_dir, "log.jsonl")
    # what a checkpoint holds, by key (no projector without an encoder; REPA-E: repae.py)
    parts = dict(zip(("ema", "ema2"), emas), model=objective.net, opt=opt, proj=objective.proj)
    parts = objective.parts() if args.repae else {k: v for k, v in parts.items() if v is not None}
    if args.resume:  # the run's weights and optimiser; its log cut back to the checkpoint
        ck = read_weights(args.resume, "--resume")
        for key, part in parts.items():
            part.load_state_dict(ck[key])
        step = ck["step"]
        if rank == 0:
            rewind(args.out_dir, step)
    loader = load_data(args, vae, device, rank, world, step)
    train_step = make_step(args, objective, encoder, vae, emas, opt, device, world)
    warmup = args.warmup_steps
    warmup = 5 * (loader.dataset.n // args.batch_size) if warmup is None else warmup  # JiT's
    board = open_run(args, opt, step, world, device) if rank == 0 else None  # --wandb's run
    mf = args.objective == "meanflow"  # its loss is weighted to ~1: its error tells progress
    curves = ("denoise",) if mf else ("loss", "denoise")
    curves += ("repa",) if args.encoder != "none" else ()
    curves += ("rec", "lpips", "vae_align", "d_loss") if args.repae else ()  # the VAE's side
    stop, handler = catch_interrupt(world)  # Ctrl-C: this step is the last, checkpointed
    acc = torch.zeros(len(repae.LOGGED) if args.repae else 4, device=device)  # sums to log
    t0, last_log = time.time(), step
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, desc="train")
    for x, y, lat in loader:
        torch.manual_seed(args.seed * 1_000_003 + step * world + rank)  # step s's noise
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / warmup) if warmup else args.lr
        acc += train_step(x, y, lat)
        step += 1
        bar.update(1)
        end = step == args.steps
        last = end or bool(stop)  # after Ctrl-C: logged and checkpointed, not sampled
        if step % args.log_every == 0 or step % args.ckpt_every == 0 or last:
            if world > 1:  # logged before any checkpoint, so that a NaN is never saved
                dist.all_reduce(acc)
            loss, denoise, repa, gnorm, *more = (acc / world / (step - last_log)).tolist()
            if not math.isfinite(loss):
                good = sorted(glob.glob(os.path.join(args.out_dir, "checkpoints", "*.pt")))
                raise SystemExit(f"loss is {loss} around step {step}: stopping; last good "
                                 f"checkpoint: {(good or ['none'])[-1]}")
            ips = (step - last_log) * args.batch_size / (time.time() - t0) / world
            bar.set_postfix({"error" if mf else "loss": f"{denoise if mf else loss:.4f}",
                             "repa": f"{repa:.3f}", "ips": f"{ips:.0f}"})
            rec = dict(step=step, loss=loss, denoise=denoise, repa=repa, grad_norm=gnorm,
                       lr=opt.param_groups[0]["lr"], img_s_per_gpu=ips)
            rec.update(zip(repae.LOGGED[4:], more))  # REPA-E's VAE and discriminator
            if rank == 0:
                with open(log, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if board:
                board.log(rec, step=step)
            acc.zero_()
            t0, last_log = time.time(), step
        grid = rank == 0 and args.sample_every and (step % args.sample_every == 0 or end)
        if grid:
            sample_grid(emas[0], vae, args, step, device)
        if rank == 0 and (grid or last) and os.path.exists(log):
            save_curves(log, os.path.join(args.out_dir, "curves.png"), curves)
        if step % args.ckpt_every == 0 or last:
            if rank == 0:
                state = {k: part.state_dict() for k, part in parts.items()}
                state.update(args=vars(args), step=step)
                save_checkpoint(state, os.path.join(args.out_dir, "checkpoints", f"{step:07d}.pt"))
            if world > 1:
                dist.barrier()
        if last:  # not `stop`: a Ctrl-C during a grid or checkpoint makes the next step the last
            break
    bar.close()
    signal.signal(signal.SIGINT, handler)
    if stop and step < args.steps:
        raise SystemExit(f"stopped at step {step}, checkpointed; to go on: "
                         f"python train.py --resume {shlex.quote(args.out_dir)}")
    if world > 1:  # every replica must hold the same weights: per-tensor sums across ranks
        sums = torch.stack([p.detach().double().sum() for p in objective.parameters()])
        lo, hi = sums.clone(), sums.clone()
        dist.all_reduce(lo, dist.ReduceOp.MIN)
        dist.all_reduce(hi, dist.ReduceOp.MAX)
        if rank == 0:
            print(f"replicas identical across {world} ranks: {bool(torch.equal(lo, hi))}")
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
