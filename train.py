"""
Train SiT (SD-VAE latents) or JiT (pixels) with REPA or iREPA, from a CPU demo to multi-node DDP.

    python train.py                                                   # offline demo, generated data, CPU ok
    python train.py --encoder dinov2-vit-s --encoder-weights random --irepa   # the iREPA path, offline
    torchrun --nproc_per_node=8 train.py --encoder dinov2-vit-b --irepa --data-path /imagenet/train
    torchrun --nproc_per_node=8 train.py --model JiT-B/16 --encoder dinov2-vit-b --irepa --data-path ...
    python train.py --resume out/JiT-demo-16-none                     # continue exactly where it stopped

Presets: without --model and --data-path the small offline demo runs (JiT-demo/16, 64 px, generated
shapes); otherwise the model family's paper recipe (README). A flag given explicitly always wins.
With --data-path (ImageNet-style class folders) the first run prepares memory-mapped arrays once
(ADM center crops as uint8, labels, and for SiT the SD-VAE posterior mean/std); later runs reuse them.
Randomness is a function of (seed, step, rank): the noise of step s is drawn after reseeding with
them, and the data order is a permutation seeded by (seed, epoch), so a resumed run repeats the
uninterrupted one exactly and the checkpoint's step is its data and RNG position (bit for bit when eager;
compiled GPU kernels add some gradients in a varying order, so there the last bits differ run to run).
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
from PIL import Image, ImageDraw
from tqdm import tqdm

import align
import encoders
from model import build_model, models
from sample import check_at_least, find_checkpoint, generate, noise_std, open_rgb, save_grid, setup_device

# -----------------------------------------------------------------------------
# Generated data: class-conditional shapes and colours the project draws itself, so that everything
# runs offline. Class k has its own shape and colour; position, size and background vary per image.

NUM_GENERATED_CLASSES = 10
_SHAPES = ["circle", "square", "triangle", "diamond", "ring", "cross", "hbar", "vbar", "star", "half"]
_COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 40), (220, 60, 220),
            (40, 220, 230), (250, 140, 20), (120, 40, 160), (245, 245, 245), (20, 20, 20)]


def _draw(k, size, rng):
    bg = tuple(int(v) for v in rng.integers(70, 170, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.22, 0.34)
    cx, cy = size * rng.uniform(0.35, 0.65, 2)
    box = [cx - r, cy - r, cx + r, cy + r]
    c, shape = _COLOURS[k], _SHAPES[k]
    if shape == "circle":
        d.ellipse(box, fill=c)
    elif shape == "square":
        d.rectangle(box, fill=c)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=c)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=c)
    elif shape == "ring":
        d.ellipse(box, outline=c, width=max(1, int(r / 3)))
    elif shape == "cross":
        d.line([box[0], box[1], box[2], box[3]], fill=c, width=max(1, int(r / 3)))
        d.line([box[0], box[3], box[2], box[1]], fill=c, width=max(1, int(r / 3)))
    elif shape == "hbar":
        d.rectangle([box[0], cy - r / 3, box[2], cy + r / 3], fill=c)
    elif shape == "vbar":
        d.rectangle([cx - r / 3, box[1], cx + r / 3, box[3]], fill=c)
    elif shape == "star":
        pts = [(cx + (r if i % 2 == 0 else r / 2.5) * math.cos(math.pi * i / 5 - math.pi / 2),
                cy + (r if i % 2 == 0 else r / 2.5) * math.sin(math.pi * i / 5 - math.pi / 2)) for i in range(10)]
        d.polygon(pts, fill=c)
    else:
        d.pieslice(box, 180, 360, fill=c)
    return np.asarray(img)


def generated_images(n, image_size, seed=0):
    """n deterministic images -> (uint8 (n, 3, R, R), long (n,)), labels cycling through the classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % NUM_GENERATED_CLASSES
    imgs = np.stack([_draw(int(k), image_size, rng) for k in labels])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long()

# -----------------------------------------------------------------------------
# ImageNet-style folders -> memory-mapped arrays, once


def center_crop(pil, size):
    """ADM center crop: halve with a box filter while large, bicubic to the short side, center crop."""
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(s * scale) for s in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


@torch.no_grad()
def posterior(vae, images, out, device, batch=64):
    """SD-VAE posterior of uint8 images (N, 3, R, R), written batch by batch into out (N, 8, R/8, R/8): mean | std."""
    for i in tqdm(range(0, len(images), batch), desc="SD-VAE posterior"):
        mean, std = vae.encode(torch.from_numpy(np.asarray(images[i:i + batch])).to(device).float() / 127.5 - 1)
        out[i:i + batch] = torch.cat([mean, std], 1).cpu().numpy()
    return out


def prepare(data_path, out, image_size, vae, vae_name, device):
    """Class folders (sorted names -> labels 0..C-1) -> out/{images.npy (N,3,R,R) uint8, labels.npy,
    [latents.npy (N,8,R/8,R/8) float32: VAE posterior mean|std], meta.json}. Corrupt files are reported and
    skipped. meta.json, written last, names the source, size and VAE: without it the preparation did not finish."""
    classes = sorted(d for d in os.listdir(data_path) if os.path.isdir(os.path.join(data_path, d)))
    files = [(os.path.join(data_path, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(data_path, c)))]
    if not files:
        raise SystemExit(f"no images under {data_path}: expected one sub-folder of images per class")
    os.makedirs(out, exist_ok=True)
    imgs = np.lib.format.open_memmap(os.path.join(out, "images.tmp.npy"), "w+", np.uint8,
                                     (len(files), 3, image_size, image_size))
    labels, n = [], 0
    for path, label in tqdm(files, desc=f"preparing {data_path}"):
        try:
            imgs[n] = center_crop(open_rgb(path), image_size).transpose(2, 0, 1)
        except ValueError as e:
            print(f"skipping unreadable image {e}", file=sys.stderr)
            continue
        labels.append(label)
        n += 1
    imgs.flush()
    np.save(os.path.join(out, "labels.npy"), np.array(labels, dtype=np.int64))
    if vae is not None:
        posterior(vae, imgs[:n], np.lib.format.open_memmap(os.path.join(out, "latents.npy"), "w+", np.float32,
                                                           (n, 8, image_size // 8, image_size // 8)), device).flush()
    del imgs
    final = np.load(os.path.join(out, "images.tmp.npy"), mmap_mode="r")[:n]
    np.save(os.path.join(out, "images.npy"), final)  # drops the skipped slots at the end
    os.remove(os.path.join(out, "images.tmp.npy"))
    with open(os.path.join(out, "meta.tmp.json"), "w") as f:
        json.dump({"source": os.path.abspath(data_path), "image_size": image_size, "vae": vae_name,
                   "classes": classes}, f)
    os.replace(os.path.join(out, "meta.tmp.json"), os.path.join(out, "meta.json"))


class Batches(torch.utils.data.Dataset):
    """Item s = this rank's slice of global batch s: (uint8 images, labels, latents or None).
    Order: a permutation per epoch seeded by (seed, epoch); JiT's flips seeded by (seed, step)."""

    def __init__(self, images, labels, latents, global_batch, rank, world, seed, flip):
        self.images, self.labels, self.latents = images, labels, latents
        self.n, self.B, self.b, self.rank = len(labels), global_batch, global_batch // world, rank
        self.seed, self.flip = seed, flip
        self._epoch, self._perm = None, None  # this epoch's permutation, made on first use (ImageNet: 1.28M)
        if self.n < global_batch:
            raise SystemExit(f"the dataset has {self.n} images, fewer than one global batch of {global_batch}")

    def __len__(self):
        return 2 ** 62

    def __getitem__(self, step):
        per_epoch = self.n // self.B
        epoch, i = divmod(step, per_epoch)
        if self._epoch != epoch:
            self._epoch, self._perm = epoch, np.random.default_rng((self.seed, epoch)).permutation(self.n)
        idx = np.sort(self._perm[i * self.B + self.rank * self.b: i * self.B + (self.rank + 1) * self.b])
        x = torch.from_numpy(np.ascontiguousarray(self.images[idx]))
        if self.flip:
            flips = np.random.default_rng((self.seed, 1, step)).random(self.B)[self.rank * self.b:][:self.b] < 0.5
            x[torch.from_numpy(flips)] = x[torch.from_numpy(flips)].flip(-1)
        lat = torch.from_numpy(np.ascontiguousarray(self.latents[idx])) if self.latents is not None else None
        return x, torch.from_numpy(np.asarray(self.labels[idx])), lat

# -----------------------------------------------------------------------------
# The training objective: denoising loss (SiT or JiT) + coeff * REPA/iREPA alignment


class Objective(nn.Module):
    """Holds the network and the projector, so DDP and torch.compile see one module."""

    def __init__(self, net, projector, family, align_depth, gamma, coeff, noise_scale=1.0):
        super().__init__()
        self.net, self.proj, self.family = net, projector, family
        self.align_depth, self.gamma, self.coeff, self.noise_scale = align_depth, gamma, coeff, noise_scale

    def forward(self, x, y, target):
        B, depth = x.shape[0], self.align_depth if self.proj is not None else None
        if self.family == "SiT":  # linear interpolant, t=0 data, t=1 noise, v-prediction
            t = torch.rand(B, device=x.device)
            eps = torch.randn_like(x)
            tt = t.view(-1, 1, 1, 1)
            out, h = self.net((1 - tt) * x + tt * eps, t, y, depth)
            denoise = ((out.float() - (eps - x)) ** 2).mean(dim=(1, 2, 3)).mean()
        else:  # JiT: t ~ logit-normal(-0.8, 0.8), t=1 data, x-prediction, loss on velocity
            t = torch.sigmoid(torch.randn(B, device=x.device) * 0.8 - 0.8)
            tt = t.view(-1, 1, 1, 1)
            z = tt * x + (1 - tt) * torch.randn_like(x) * self.noise_scale
            out, h = self.net(z, t, y, depth)
            v, v_pred = (x - z) / (1 - tt).clamp_min(0.05), (out.float() - z) / (1 - tt).clamp_min(0.05)
            denoise = ((v - v_pred) ** 2).mean(dim=(1, 2, 3)).mean()
        if self.proj is None:
            return denoise, denoise, torch.zeros_like(denoise)
        rep = align.alignment_loss(self.proj, h, target, self.gamma)
        return denoise + self.coeff * rep, denoise, rep

# -----------------------------------------------------------------------------
# Configuration: presets per recipe, explicit flags win


PRESETS = {
    "demo": dict(model="JiT-demo/16", image_size=64, batch_size=64, lr=1e-3, steps=1000, log_every=50,
                 ckpt_every=500, sample_every=500, warmup_steps=50, ema="0.99,0.98"),  # short run: short EMAs
    "SiT": dict(model="SiT-B/2", image_size=256, batch_size=256, lr=1e-4, steps=400_000, log_every=100,
                ckpt_every=50_000, sample_every=10_000, warmup_steps=0, ema="0.9999"),
    "JiT": dict(model="JiT-B/16", image_size=256, batch_size=1024, lr=None, steps=250_000, log_every=100,
                ckpt_every=50_000, sample_every=10_000, warmup_steps=None, ema="0.9999,0.9996"),
}
PEAK_FLOPS = 800e12  # MFU's denominator: a practical H100 bf16 rate (the datasheet's dense peak is 989e12; README)
FAMILY = {  # the parts of each recipe that are not flags (README, "Training")
    "SiT": dict(betas=(0.9, 0.999), clip=1.0, flip=False),
    "JiT": dict(betas=(0.9, 0.95), clip=None, flip=True),
}


def get_args(argv=None):
    # allow_abbrev=False: on --resume only the flags given verbatim override the checkpoint's (see `given`)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="SiT-{S,B,L,XL}/{2,4,8}, JiT-{B,L,H}/{16,32} or JiT-demo/16 (default: SiT-B/2, "
                   "or the demo when no --data-path)")
    p.add_argument("--encoder", default="none", help="target encoder name (encoders.py) or 'none' for no alignment")
    p.add_argument("--encoder-weights", help="encoder weights: a local file, or 'random' (tests, benchmarks); "
                   "default: timm's pretrained download")
    p.add_argument("--vae-weights", help="SD-VAE (SiT): a local diffusers safetensors file, or 'random'; "
                   "default: stabilityai/sd-vae-ft-mse from the HF hub")
    p.add_argument("--vae-stats", help="SiT: per-channel latent statistics file (iREPA/REPA-E); default scale 0.18215")
    p.add_argument("--irepa", action="store_true", help="iREPA: conv projector + spatial norm, family's paper defaults")
    p.add_argument("--proj", choices=["mlp", "conv"], help="projector (default: mlp, conv with --irepa)")
    p.add_argument("--spnorm-gamma", type=float, help="spatial-norm gamma of the target tokens (default: none, "
                   "0.6 SiT / 0.8 JiT with --irepa; a negative value disables it)")
    p.add_argument("--proj-coeff", type=float, help="weight of the alignment loss (default: the paper's)")
    p.add_argument("--encoder-depth", type=int, help="align the tokens after this block (default: 4 for S/B, 8 for L/XL/H)")
    p.add_argument("--data-path", help="ImageNet-style class folders (prepared once into --prepared-dir)")
    p.add_argument("--prepared-dir", help="where prepared arrays live (default: <out-dir>/../prepared-<name>-<size>)")
    p.add_argument("--num-classes", type=int, help="default: 1000 with --data-path, 10 for generated data")
    p.add_argument("--num-generated", type=int, default=2000, help="size of the generated dataset")
    p.add_argument("--batch-size", type=int, help="global batch size, split over ranks")
    p.add_argument("--lr", type=float, help="learning rate (JiT default: 5e-5 * batch / 256)")
    p.add_argument("--warmup-steps", type=int, help="linear warmup (JiT default: 5 epochs, SiT: none)")
    p.add_argument("--ema", help="EMA decay(s), comma-separated; samples use the first (SiT 0.9999; JiT 0.9999,0.9996)")
    p.add_argument("--steps", type=int, help="total optimisation steps")
    p.add_argument("--ckpt-every", type=int, help="checkpoint every N steps (and at the end)")
    p.add_argument("--sample-every", type=int, help="PNG sample grid from the EMA every N steps and at the end "
                   "(0: never)")
    p.add_argument("--log-every", type=int, help="reduce, print and log every N steps")
    p.add_argument("--out-dir", help="run directory (default: out/<model>-<encoder>)")
    p.add_argument("--resume", help="a run directory (latest checkpoint) or a checkpoint file")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the training step and "
                   "the encoder (default: on with a GPU, 1.5x the eager speed; off on CPU, where compiling takes minutes)")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--image-size", type=int, help="image side in pixels; the token grid follows it")
    p.add_argument("--seed", type=int, default=0, help="global seed")
    p.add_argument("--num-workers", type=int, default=4, help="data loader processes per rank")
    p.add_argument("--recompute", type=int, default=0, help="activation checkpointing of the first N blocks: "
                   "less memory (e.g. SiT-XL/2 at batch 256 per H100), more compute")
    p.add_argument("--bench", type=int, default=0, help="benchmark: time N steps after warmup, print img/s, MFU, "
                   "memory and a kernel profile")
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
    given = {a.dest for a in p._actions if any(s == o or s.startswith(o + "=") for s in argv for o in a.option_strings)}
    if args.resume and (args.bench or given & {"irepa", "proj"}):
        p.error("--resume continues a run as it was: it takes no --bench, --irepa or --proj")
    if args.resume:  # the checkpoint's configuration, then the flags given now
        try:
            path = os.path.abspath(find_checkpoint(args.resume))
            ck = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # mmap: reads args, not weights
            saved, ck_step = ck["args"], ck["step"]
        except FileNotFoundError as e:
            p.error(f"--resume {e}")
        except Exception as e:  # truncated file, not a torch file, not a train.py checkpoint
            p.error(f"--resume {args.resume}: not a readable train.py checkpoint ({type(e).__name__}: {e})")
        for k, v in saved.items():
            if k not in given:
                setattr(args, k, v)
        if "out_dir" not in given and os.path.basename(os.path.dirname(path)) == "checkpoints":
            args.out_dir = os.path.dirname(os.path.dirname(path))  # the run continues where its checkpoint is
        if ck_step >= args.steps:
            p.error(f"--resume {path} is at step {ck_step} already: pass --steps above it to go on")
        args.resume = path
    else:
        preset = "JiT" if (args.model or "").startswith("JiT") else "SiT"
        preset = "demo" if args.model is None and args.data_path is None else preset
        for k, v in PRESETS[preset].items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    if args.model not in models:  # before anything parses the name
        p.error(f"unknown model {args.model!r}; choose one of: {', '.join(models)}")
    if not args.resume:  # the method's and family's defaults (a resumed run has its own)
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
        args.out_dir = args.out_dir or os.path.join("out", f"{args.model.replace('/', '-')}-{args.encoder}")
    args.spnorm_gamma = None if args.spnorm_gamma is not None and args.spnorm_gamma < 0 else args.spnorm_gamma
    return args


def trim_log(path, step):
    """On resume: keep the log records up to the checkpoint's step (a killed run logs past its last checkpoint,
    and its last line may be cut), so that log.jsonl reads as one uninterrupted run."""
    keep = []
    for line in open(path):
        try:
            keep += [line] if json.loads(line)["step"] <= step else []
        except (ValueError, KeyError):
            pass
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def save_checkpoint(state, path):
    """Atomic: a killed write leaves the previous checkpoint and no half file under the final name."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)

# -----------------------------------------------------------------------------
# Main loop


def main(argv=None):
    args = get_args(argv)
    device, rank, world = setup_device()
    ddp = world > 1
    family = "JiT" if args.model.startswith("JiT") else "SiT"
    fam = FAMILY[family]

    # ---- everything that can be wrong is checked before any training (cheap checks first)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by the world size {world}")
    if args.data_path and not os.path.isdir(args.data_path):
        raise SystemExit(f"--data-path {args.data_path} does not exist")
    token_px = int(args.model.split("/")[-1]) * (8 if family == "SiT" else 1)  # SiT: VAE factor 8 x patch
    if args.image_size % token_px:
        raise SystemExit(f"--image-size {args.image_size} is not a multiple of {token_px}, the pixels per token of "
                         f"{args.model}")
    if args.encoder != "none":
        if args.encoder not in encoders.ENCODERS:
            raise SystemExit(f"unknown encoder {args.encoder!r}; choose one of: {', '.join(encoders.ENCODERS)}")
        grid = args.image_size // token_px
        if grid != args.image_size // 16:
            raise SystemExit(f"{args.model} at {args.image_size} px has a {grid}x{grid} token grid but {args.encoder} "
                             f"gives {args.image_size // 16}x{args.image_size // 16} tokens: use a model with 16-pixel "
                             "tokens (SiT-*/2, JiT-*/16) or --encoder none")
    torch.manual_seed(args.seed)  # the same initial weights on every rank and every rerun
    net = build_model(args.model, args.image_size, args.num_classes).to(device)
    if args.encoder != "none" and args.encoder_depth > len(net.blocks):
        raise SystemExit(f"--encoder-depth {args.encoder_depth}: {args.model} has {len(net.blocks)} blocks")
    encoder = vae = projector = None
    if args.encoder != "none":
        encoder = encoders.load_encoder(args.encoder, args.image_size, weights=args.encoder_weights).to(device)
        projector = align.make_projector(net.hidden_size, encoder.embed_dim, args.proj == "conv").to(device)
    if family == "SiT":
        vae = encoders.load_vae(args.vae_weights, args.vae_stats).to(device)

    # ---- data
    if args.data_path:
        name = f"prepared-{os.path.basename(os.path.normpath(args.data_path))}-{args.image_size}"
        beside = os.path.join(os.path.dirname(os.path.abspath(args.out_dir)), name)  # next to the run folder
        prep = next((d for d in (args.prepared_dir, beside) if d and os.path.exists(os.path.join(d, "meta.json"))),
                    args.prepared_dir or beside)  # a resumed run moved with its arrays finds them beside it
        source = os.path.abspath(args.data_path)
        vae_name = None  # whose latents the arrays hold: a file, "random" or the hub's (JiT: none)
        if family == "SiT":
            vae_name = args.vae_weights or "stabilityai/sd-vae-ft-mse"
            vae_name = os.path.abspath(vae_name) if os.path.isfile(vae_name) else vae_name
        meta_path = os.path.join(prep, "meta.json")
        meta = json.load(open(meta_path)) if os.path.exists(meta_path) else None
        if meta and (meta["source"], meta["image_size"]) != (source, args.image_size):
            raise SystemExit(f"{prep} holds {meta['source']} at {meta['image_size']} px, not {source} at "
                             f"{args.image_size} px: pass another --prepared-dir or delete it")
        if meta and vae_name and meta.get("vae") not in (None, vae_name):
            raise SystemExit(f"{prep} holds latents of the VAE {meta['vae']}, not {vae_name}: pass another "
                             "--prepared-dir or delete it")
        no_latents = meta is not None and vae_name and meta.get("vae") is None  # JiT's arrays, for a SiT run
        if rank == 0 and (meta is None or no_latents):
            if no_latents:
                print(f"{prep} holds JiT's arrays without latents: preparing it again for SiT")
            prepare(args.data_path, prep, args.image_size, vae, vae_name, device)
        args.prepared_dir = prep  # in the checkpoints: a moved run still finds its arrays
        if ddp:
            dist.barrier()
        images = np.load(os.path.join(prep, "images.npy"), mmap_mode="r")
        labels = np.load(os.path.join(prep, "labels.npy"))
        latents = np.load(os.path.join(prep, "latents.npy"), mmap_mode="r") if family == "SiT" else None
        if labels.max() >= args.num_classes:
            raise SystemExit(f"{prep} has {labels.max() + 1} classes but --num-classes is {args.num_classes}")
    else:
        images, labels = generated_images(args.num_generated, args.image_size, seed=1234)
        images, labels, latents = images.numpy(), labels.numpy(), None
        if family == "SiT":  # the posterior of the generated images, computed once
            r = args.image_size // 8
            latents = posterior(vae, images, np.empty((len(images), 8, r, r), np.float32), device)
    data = Batches(images, labels, latents, args.batch_size, rank, world, args.seed, fam["flip"])
    warmup = args.warmup_steps if args.warmup_steps is not None else 5 * (data.n // args.batch_size)

    # ---- model, EMA(s), optimiser
    objective = Objective(net, projector, family, args.encoder_depth, args.spnorm_gamma, args.proj_coeff,
                          noise_scale=noise_std(family, args.image_size))
    decays = [float(d) for d in args.ema.split(",")]
    emas = [copy.deepcopy(net).requires_grad_(False) for _ in decays]
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=fam["betas"], weight_decay=0.0,
                            fused=device.type == "cuda")
    step = 0
    if args.bench:  # 5 warmup/compile steps, N timed steps, then 3 steps under the profiler
        args.steps, args.log_every = 8 + args.bench, 8 + args.bench
    if args.resume:
        ck = torch.load(args.resume, map_location="cpu", weights_only=False)
        try:
            net.load_state_dict(ck["model"])
            for ema, key in zip(emas, ("ema", "ema2")):
                ema.load_state_dict(ck[key])
            if (projector is None) != (ck["proj"] is None):
                raise ValueError("the run was trained " + ("without" if ck["proj"] is None else "with") + " an encoder")
            if projector is not None:
                projector.load_state_dict(ck["proj"])
            opt.load_state_dict(ck["opt"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise SystemExit(f"--resume {args.resume} does not fit the flags given now (--model, --image-size, "
                             f"--num-classes, --encoder, --proj, --ema must match the run's): {str(e)[:600]}")
        step = ck["step"]
        if rank == 0 and os.path.exists(os.path.join(args.out_dir, "log.jsonl")):
            trim_log(os.path.join(args.out_dir, "log.jsonl"), step)
    train_obj = nn.parallel.DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None,
                                                    gradient_as_bucket_view=True) if ddp else objective
    if ddp and args.compile:
        # One compiled graph; the gradients are all-reduced after the backward instead of overlapping it. Overlap
        # (Dynamo's per-bucket graphs) let NCCL's kernels slow the compute kernels ~5%, while the all-reduce alone
        # takes ~1.7 ms per step (2x H200, SiT-B/2: 1,934-1,938 vs 1,875-1,903 img/s per GPU; README, Performance)
        torch._dynamo.config.optimize_ddp = False
    step_fn = torch.compile(train_obj) if args.compile else train_obj
    encode = torch.compile(encoder) if args.compile and encoder is not None else encoder
    trainable = [p for p in net.parameters() if p.requires_grad]  # frozen pos-embed stays out of the EMA
    ema_params = [[e for e, p in zip(ema.parameters(), net.parameters()) if p.requires_grad] for ema in emas]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    if rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        print(json.dumps(vars(args), indent=1, default=str))
        n_par = sum(p.numel() for p in params)
        print(f"{args.model}: {n_par:,} trainable parameters (incl. projector), {world} rank(s), device {device}")

    workers = args.num_workers if device.type == "cuda" else 0  # CPU runs: no worker start-up cost
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers, sampler=range(step, args.steps),
                                         pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    flops_per_img = count_flops(objective, encoder, data, device, amp, family, vae) if device.type == "cuda" else None
    net.recompute = args.recompute  # after counting: MFU counts useful FLOPs, not recomputed ones
    acc = torch.zeros(4, device=device)  # sums of loss, denoise, repa, grad norm since the last log
    t0, last_log = time.time(), step
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, desc="train")
    timing = {}  # --bench only: step -> time, and the profiler
    for x, y, lat in loader:
        torch.manual_seed(args.seed * 1_000_003 + step * world + rank)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad():
            target = None
            if encoder is not None:
                with amp:
                    target = encode(x)                               # (B, T, Dz) from uint8 images
            if family == "SiT":
                lat = lat.to(device, non_blocking=True)
                mean, std = lat.chunk(2, dim=1)
                inp = vae.scale(mean + std * torch.randn_like(mean))  # posterior re-sampled every step
            else:
                inp = x.float() / 127.5 - 1
            y = torch.where(torch.rand(y.shape, device=device) < 0.1, args.num_classes, y)  # CFG label drop
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / warmup) if warmup else args.lr
        with amp:
            loss, denoise, rep = step_fn(inp, y, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if fam["clip"]:
            gnorm = torch.nn.utils.clip_grad_norm_(params, fam["clip"])
        else:  # JiT does not clip: the norm alone, for the log (clipping at inf would rescale every grad by 1)
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        opt.step()
        with torch.no_grad():
            for ema_p, decay in zip(ema_params, decays):
                torch._foreach_lerp_(ema_p, trainable, 1 - decay)
            acc += torch.stack([loss.detach().float(), denoise.detach().float(), rep.detach().float(), gnorm.float()])
        step += 1
        bar.update(1)
        if args.bench and step in (5, 5 + args.bench):  # bench: time the steps after warmup and compilation
            torch.cuda.synchronize() if device.type == "cuda" else None
            timing[step] = time.time()
            if step > 5 and rank == 0:
                timing["prof"] = torch.profiler.profile()
                timing["prof"].start()
        if step % args.log_every == 0 or step % args.ckpt_every == 0 or step == args.steps:  # never save a NaN
            if ddp:
                dist.all_reduce(acc)
                acc /= world
            loss_avg, den_avg, rep_avg, g_avg = (acc / (step - last_log)).tolist()
            if not math.isfinite(loss_avg):
                good = sorted(glob.glob(os.path.join(args.out_dir, "checkpoints", "*.pt"))) or ["none"]
                raise SystemExit(f"loss is {loss_avg} around step {step}: stopping; "
                                 f"the last good checkpoint is {good[-1]}")
            dt = time.time() - t0
            ips = (step - last_log) * args.batch_size / dt / world
            rec = dict(step=step, loss=loss_avg, denoise=den_avg, repa=rep_avg, grad_norm=g_avg,
                       lr=opt.param_groups[0]["lr"], img_s_per_gpu=ips)
            if flops_per_img:
                rec["mfu"] = ips * flops_per_img / PEAK_FLOPS
            if rank == 0:
                bar.set_postfix(loss=f"{loss_avg:.4f}", repa=f"{rep_avg:.3f}", ips=f"{ips:.0f}")
            if rank == 0 and not args.bench:  # a benchmark leaves no trace in a run's log
                with open(os.path.join(args.out_dir, "log.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
            acc.zero_()
            t0, last_log = time.time(), step
        if rank == 0 and args.sample_every and (step % args.sample_every == 0 or step == args.steps) and not args.bench:
            sample_grid(emas[0], family, vae, args, step, device)
        if (step % args.ckpt_every == 0 or step == args.steps) and not args.bench:
            if rank == 0:
                state = dict(model=net.state_dict(), ema=emas[0].state_dict(), opt=opt.state_dict(), args=vars(args),
                             step=step, proj=projector.state_dict() if projector is not None else None)
                if len(emas) > 1:
                    state["ema2"] = emas[1].state_dict()
                save_checkpoint(state, os.path.join(args.out_dir, "checkpoints", f"{step:07d}.pt"))
            if ddp:
                dist.barrier()
    bar.close()
    if ddp:  # every replica must hold the same weights: compare per-tensor checksums across ranks
        sums = torch.stack([p.detach().double().sum() for p in objective.parameters()])
        lo, hi = sums.clone(), sums.clone()
        dist.all_reduce(lo, dist.ReduceOp.MIN)
        dist.all_reduce(hi, dist.ReduceOp.MAX)
        if rank == 0:
            print(f"replicas identical across {world} ranks: {bool(torch.equal(lo, hi))}")
    if args.bench and rank == 0:
        timing["prof"].stop()
        table = timing["prof"].key_averages().table(sort_by="self_device_time_total", row_limit=25,
                                                    max_name_column_width=90)
        print(table)
        ips = args.bench * args.batch_size / (timing[5 + args.bench] - timing[5]) / world
        mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
        mfu = ips * flops_per_img / PEAK_FLOPS if flops_per_img else float("nan")
        print(f"BENCH {args.model} enc={args.encoder} proj={args.proj} batch={args.batch_size} world={world} "
              f"compile={args.compile} {args.precision}: {ips:.1f} img/s per GPU, MFU {mfu:.1%}, "
              f"peak memory {mem:.1f} GiB, {flops_per_img / 1e9 if flops_per_img else float('nan'):.0f} GFLOP/img")
    if ddp:
        dist.destroy_process_group()


def count_flops(objective, encoder, data, device, amp, family, vae):
    """Training FLOPs per image (network forward+backward, encoder forward), counted by torch on 2 images."""
    from torch.utils.flop_counter import FlopCounterMode
    x, y, lat = data[0]
    x, y = x[:2].to(device), y[:2].to(device)
    inp = vae.scale(lat[:2].to(device).chunk(2, 1)[0]) if family == "SiT" else x.float() / 127.5 - 1
    with FlopCounterMode(display=False) as fc:
        target = encoder(x) if encoder is not None else None  # in fp32: the counter skips bf16's fused GELU product
        with amp:
            objective(inp, y, target)[0].backward()
    objective.zero_grad(set_to_none=True)
    return fc.get_total_flops() / 2


def sample_grid(ema, family, vae, args, step, device):
    """A grid from the EMA network in eval mode: one row of each class (at most 8 classes x 8)."""
    k = min(args.num_classes, 8)
    y = torch.arange(k, device=device).repeat_interleave(8)
    gen = torch.Generator(device).manual_seed(args.seed)
    ema.eval()
    imgs = generate(ema, y, family.lower(), vae, mode="heun" if family == "JiT" else "ode", num_steps=50,
                    noise_scale=noise_std(family, args.image_size), generator=gen)
    path = os.path.join(args.out_dir, "samples", f"{step:07d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_grid(imgs, path)


if __name__ == "__main__":
    main()
