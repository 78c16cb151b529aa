"""
Data and files around the method, shared by train.py, sample.py and metrics.py; nothing here is iREPA.

  image files        open_rgb (8-bit RGB or a named error), center_crop (ADM's), save_grid (one PNG)
  generated shapes   generated_images: class-conditional shapes the project draws itself, so all runs offline
  image folders      prepare: ImageNet-style class folders -> memory-mapped uint8 crops, labels and, for SiT, the
                     SD-VAE posterior (posterior); Batches: a rank's slice of global batch s (order: seed, epoch)
                     prepared_folder (one per data set, size and VAE), prepared_arrays (prepares on first use)
  run files          setup_device (plain run or torchrun process), find_checkpoint, load_checkpoint (as data),
                     readable_checkpoint (names the newest good one), save_checkpoint (atomic), trim_log (resume),
                     Parser (one-line flag errors), at_least (a range type), check_writable
"""
import argparse
import glob
import json
import math
import os
import re
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Image files


def open_rgb(path):
    """An image file as 8-bit RGB (PIL), or a ValueError naming the file: unreadable, or 16-bit / float pixels,
    which convert("RGB") would clip to white."""
    try:
        im = Image.open(path)
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            raise ValueError(f"{im.mode} pixels (16-bit or float): convert the file to 8-bit")
        return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{path}: {e}") from None


def center_crop(pil, size):
    """ADM center crop: halve with a box filter while large, bicubic to the short side, center crop."""
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(s * scale) for s in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


def save_grid(images, path):
    """Write uint8 images (N, H, W, 3) or (N, 3, H, W) (numpy or torch) as one PNG of ceil(sqrt(N)) columns."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or 3 not in (x.shape[1], x.shape[3]):
        raise ValueError(f"save_grid wants uint8 (N,H,W,3) or (N,3,H,W), got {tuple(x.shape)} {x.dtype}")
    x = x if x.shape[3] == 3 else x.permute(0, 2, 3, 1)
    n, h, w, _ = x.shape
    cols = math.ceil(math.sqrt(n))
    grid = torch.zeros(math.ceil(n / cols) * h, cols * w, 3, dtype=torch.uint8)
    for i in range(n):
        grid[i // cols * h:(i // cols + 1) * h, i % cols * w:(i % cols + 1) * w] = x[i]
    Image.fromarray(grid.numpy()).save(path)

# -----------------------------------------------------------------------------
# Generated data: class k has its own shape and colour; position, size and background vary per image


NUM_GENERATED_CLASSES = 10
_SHAPES = ["circle", "square", "triangle", "diamond", "ring", "cross", "hbar", "vbar", "star", "half"]
_COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 40), (220, 60, 220),
            (40, 220, 230), (250, 140, 20), (120, 40, 160), (245, 245, 245), (20, 20, 20)]


def _draw(k, size, rng):
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(70, 170, 3)))
    d, c, shape = ImageDraw.Draw(img), _COLOURS[k], _SHAPES[k]
    r = size * rng.uniform(0.22, 0.34)
    cx, cy = size * rng.uniform(0.35, 0.65, 2)
    box, w = [cx - r, cy - r, cx + r, cy + r], max(1, int(r / 3))  # w: line width of the ring and the cross
    if shape == "circle":
        d.ellipse(box, fill=c)
    elif shape == "square":
        d.rectangle(box, fill=c)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=c)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=c)
    elif shape == "ring":
        d.ellipse(box, outline=c, width=w)
    elif shape == "cross":
        d.line(box, fill=c, width=w)
        d.line([box[0], box[3], box[2], box[1]], fill=c, width=w)
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
# ImageNet-style folders -> memory-mapped arrays, once; batches from them


@torch.no_grad()
def posterior(vae, images, out, device, batch=64):
    """SD-VAE posterior of uint8 images (N, 3, R, R), written batch by batch into out (N, 8, R/8, R/8): mean | std."""
    for i in tqdm(range(0, len(images), batch), desc="SD-VAE posterior"):
        mean, std = vae.encode(torch.from_numpy(np.asarray(images[i:i + batch])).to(device).float() / 127.5 - 1)
        out[i:i + batch] = torch.cat([mean, std], 1).cpu().numpy()
    return out


def class_files(folder):
    """ImageNet-style class folders -> (class names, [(file, label)]): sorted names are labels 0..C-1."""
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    return classes, [(os.path.join(folder, c, f), i) for i, c in enumerate(classes)
                     for f in sorted(os.listdir(os.path.join(folder, c)))]


def prepare(data_path, out, image_size, vae, vae_name, device):
    """Class folders (sorted names -> labels 0..C-1) -> out/{images.npy (N,3,R,R) uint8, labels.npy,
    [latents.npy (N,8,R/8,R/8) float32: VAE posterior mean|std], meta.json}. Corrupt files are reported and
    skipped. meta.json, written last, names the source, size and VAE: without it the preparation did not finish."""
    classes, files = class_files(data_path)
    if not files:
        raise SystemExit(f"no images under {data_path}: expected one sub-folder of images per class")
    os.makedirs(out, exist_ok=True)
    at = lambda name: os.path.join(out, name)
    imgs = np.lib.format.open_memmap(at("images.tmp.npy"), "w+", np.uint8, (len(files), 3, image_size, image_size))
    labels = []
    for path, label in tqdm(files, desc=f"preparing {data_path}"):
        try:
            imgs[len(labels)] = center_crop(open_rgb(path), image_size).transpose(2, 0, 1)
            labels.append(label)
        except ValueError as e:
            tqdm.write(f"skipping unreadable image {e}", file=sys.stderr)
    n, r = len(labels), image_size // 8
    np.save(at("labels.npy"), np.array(labels, dtype=np.int64))
    if vae is not None:
        posterior(vae, imgs[:n], np.lib.format.open_memmap(at("latents.npy"), "w+", np.float32, (n, 8, r, r)),
                  device).flush()
    np.save(at("images.npy"), imgs[:n])  # without the skipped slots at the end
    del imgs
    os.remove(at("images.tmp.npy"))
    with open(at("meta.tmp.json"), "w") as f:
        json.dump({"source": os.path.abspath(data_path), "image_size": image_size, "vae": vae_name,
                   "classes": classes}, f)
    os.replace(at("meta.tmp.json"), at("meta.json"))


def prepared_folder(data_path, image_size, vae_name, run_dir, prepared_dir=None):
    """The folder of data_path's arrays at image_size with vae_name's latents (None: pixels only).
    One folder per data set, size and VAE, beside the run folder unless prepared_dir: a run with
    other settings prepares its own and never rewrites these. A ValueError where the folder holds
    other arrays."""
    tag = "" if vae_name is None else "-" + os.path.splitext(os.path.basename(vae_name))[0]
    tag += "-vae" if vae_name == "random" else ""
    name = f"prepared-{os.path.basename(os.path.normpath(data_path))}-{image_size}{tag}"
    beside = os.path.join(os.path.dirname(os.path.abspath(run_dir)), name)
    done = lambda d: d and os.path.exists(os.path.join(d, "meta.json"))  # a finished preparation
    # a resumed run that moved with its arrays finds them beside it
    folder = next((d for d in (prepared_dir, beside) if done(d)), prepared_dir or beside)
    if not done(folder):
        return folder
    meta, source = json.load(open(os.path.join(folder, "meta.json"))), os.path.abspath(data_path)
    if (meta["source"], meta["image_size"]) != (source, image_size):
        raise ValueError(f"{folder} holds {meta['source']} at {meta['image_size']} px, not {source} "
                         f"at {image_size} px: pass another --prepared-dir or delete it")
    if vae_name and meta.get("vae") != vae_name:
        held = (f"latents of the VAE {meta['vae']}" if meta.get("vae") else
                "no VAE latents (a JiT run's arrays)")
        raise ValueError(f"{folder} holds {held}, not {vae_name}'s: pass another --prepared-dir, "
                         "or none (each VAE prepares its own folder beside the run)")
    return folder


def prepared_arrays(data_path, folder, image_size, vae, vae_name, device, rank=0, world=1):
    """(images, labels, latents or None) of a prepared folder, memory-mapped; where no preparation
    finished, rank 0 prepares it first and the other ranks wait."""
    if rank == 0 and not os.path.exists(os.path.join(folder, "meta.json")):
        prepare(data_path, folder, image_size, vae, vae_name, device)
    if world > 1:
        dist.barrier()
    at = lambda name: os.path.join(folder, name)
    latents = np.load(at("latents.npy"), mmap_mode="r") if vae is not None else None
    return np.load(at("images.npy"), mmap_mode="r"), np.load(at("labels.npy")), latents


class Batches(torch.utils.data.Dataset):
    """Item s = this rank's slice of global batch s, for any step s: (uint8 images, labels, latents or None).
    Order: a permutation per epoch seeded by (seed, epoch); JiT's flips seeded by (seed, step)."""

    def __init__(self, images, labels, latents, global_batch, rank, world, seed, flip):
        self.images, self.labels, self.latents = images, labels, latents
        self.n, self.B, self.b, self.rank = len(labels), global_batch, global_batch // world, rank
        self.seed, self.flip = seed, flip
        self._epoch, self._perm = None, None  # this epoch's permutation, made on first use (ImageNet: 1.28M)
        if self.n < global_batch:
            raise SystemExit(f"the dataset has {self.n} images, fewer than one global batch of {global_batch}")

    def __getitem__(self, step):
        epoch, i = divmod(step, self.n // self.B)  # n // B whole global batches per epoch
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
# Run files and processes, shared by train.py and sample.py


def setup_device():
    """(device, rank, world size) for a plain run or one torchrun process; TF32 matmuls on GPU, as the official."""
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device, dist.get_rank(), dist.get_world_size()
    return device, 0, 1


def find_checkpoint(path):
    """A checkpoint file, or the newest checkpoints/*.pt of a train.py run directory."""
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(path, "checkpoints", "*.pt")))  # a killed write leaves *.pt.tmp: skipped
    if not found:
        raise FileNotFoundError(f"{path}: no such file, and not a run directory with checkpoints/*.pt")
    return found[-1]


def load_checkpoint(path, mmap=False):
    """A checkpoint file as data: torch.load with weights_only=True runs no code from the file. Beyond tensors
    and containers it admits argparse.Namespace, the `args` of the official SiT and JiT checkpoints."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, not a torch file, or a pickle that is more than data
        code = re.search(r"GLOBAL ([\w.]+)", str(e))  # what the file would call on loading
        why = f"refused: it holds {code[1]}, which loading would run as code" if code else \
            f"not a readable checkpoint ({type(e.__context__ or e).__name__}: {e.__context__ or e})"
        raise ValueError(f"{path}: {why}") from None


def readable_checkpoint(path):
    """(file, checkpoint read as data, tensors memory-mapped) of a checkpoint file or a train.py run
    directory (its newest checkpoint); a ValueError naming a damaged file and the newest good one."""
    path = os.path.abspath(find_checkpoint(path))

    def read(f):
        try:
            ck = load_checkpoint(f, mmap=True)
            return ck if isinstance(ck, dict) and {"args", "step", "model"} <= set(ck) else None
        except ValueError:  # truncated, not a torch file, or a pickle that is more than data
            return None
    ck = read(path)
    if ck is None:
        older = sorted(f for f in glob.glob(os.path.join(os.path.dirname(path), "*.pt")) if f < path)
        good = next((f for f in reversed(older) if read(f)), None)
        hint = f"; the newest good one is {good}: resume from it with --resume {good}" if good else ""
        raise ValueError(f"{path} is not a readable train.py checkpoint (damaged?){hint}")
    return path, ck


def save_checkpoint(state, path):
    """Atomic: a killed write leaves the previous checkpoint and no half file under the final name."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


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


class Parser(argparse.ArgumentParser):
    """The scripts' argument parser: an error is one line, the reason and "see --help", not the usage
    block; allow_abbrev off, so a flag counts as given only when spelled out (train.py's resume)."""

    def __init__(self, description):
        super().__init__(description=description, allow_abbrev=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def at_least(least, kind=int):
    """An argparse type: a number of `kind` not below `least`, so ranges are checked while parsing."""
    def parse(text):
        value = kind(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid int value" names the type by this
    return parse


def check_at_least(parser, args, names, least=1):
    """argparse error unless every given flag among `names` (argparse dests) is at least `least`."""
    for k in names:
        if getattr(args, k) is not None and getattr(args, k) < least:
            parser.error(f"--{k.replace('_', '-')} must be at least {least}, got {getattr(args, k)}")


def check_writable(parser, outputs):
    """argparse error unless the folder of every given output path (flag, path) exists and is writable."""
    for flag, path in outputs:
        if path and not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
            parser.error(f"{flag} {path}: its folder does not exist or is not writable")
