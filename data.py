"""Images, generated shapes, prepared data, checkpoints, sample shards, flags: none of it iREPA."""
import argparse
import contextlib
import glob
import hashlib
import json
import math
import os
import re
import shutil
import sys
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from tqdm import tqdm


def open_rgb(path):
    """An image file as 8-bit RGB (PIL), or a ValueError naming the file."""
    try:
        im = Image.open(path)
        if im.mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
            return im.convert("RGB")
        why = f"{im.mode} pixels (16-bit or float): convert the file to 8-bit"  # RGB: white
    except (OSError, ValueError, SyntaxError) as e:
        why = e
    raise ValueError(f"{path}: {why}")


def center_crop(pil, size):
    """ADM center crop: halve with a box filter while large, bicubic to the short side, crop."""
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(s * scale) for s in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


def save_grid(images, path):
    """uint8 images (N, H, W, 3) as one PNG of ceil(sqrt(N)) columns."""
    x = torch.as_tensor(images)
    n, h, w, _ = x.shape
    cols = math.ceil(math.sqrt(n))
    grid = x.new_zeros(math.ceil(n / cols) * h, cols * w, 3)  # other dtypes: PIL refuses
    for i in range(n):
        grid[i // cols * h:(i // cols + 1) * h, i % cols * w:(i % cols + 1) * w] = x[i]
    Image.fromarray(grid.numpy()).save(path)


def save_curves(log, path, keys):
    """A log.jsonl's keys over the steps as one PNG: a 640 x 160 panel each, its own y range."""
    recs = [json.loads(line) for line in open(log) if line.endswith("\n")]
    steps = np.array([r["step"] for r in recs])
    im = Image.new("RGB", (640, 160 * len(keys)), "white")
    draw = ImageDraw.Draw(im)
    left, right = 70, 630  # room for the y labels on the left
    for i, key in enumerate(keys):
        top, bottom = i * 160 + 20, (i + 1) * 160 - 20  # the panel's plot area
        ys = np.array([r[key] for r in recs])
        lo, hi = ys.min(), ys.max()
        xs = left + (right - left) * (steps - steps[0]) / max(steps[-1] - steps[0], 1)
        ys = bottom - (bottom - top) * (ys - lo) / ((hi - lo) or 1)
        draw.rectangle((left, top, right, bottom), outline="gray")
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill="blue", width=2)
        draw.text((left, top - 15), key, fill="black")
        draw.text((4, top), f"{hi:.4g}", fill="black")
        draw.text((4, bottom - 12), f"{lo:.4g}", fill="black")
        draw.text((right - 120, bottom + 4), f"steps {steps[0]}-{steps[-1]}", fill="black")
    im.save(path)


NUM_GENERATED_CLASSES = 10  # class k: its own shape and colour; place, size, background vary
_SHAPES = ["circle", "square", "triangle", "diamond", "ring",
           "cross", "hbar", "vbar", "star", "half"]
_COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 40), (220, 60, 220),
            (40, 220, 230), (250, 140, 20), (120, 40, 160), (245, 245, 245), (20, 20, 20)]


def _draw(k, size, rng):
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(70, 170, 3)))
    d, c, shape = ImageDraw.Draw(img), _COLOURS[k], _SHAPES[k]
    r = size * rng.uniform(0.22, 0.34)
    cx, cy = size * rng.uniform(0.35, 0.65, 2)
    box, w = [cx - r, cy - r, cx + r, cy + r], max(1, int(r / 3))  # w: ring and cross lines
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
        corners = [(r if i % 2 == 0 else r / 2.5, math.pi * i / 5 - math.pi / 2) for i in range(10)]
        d.polygon([(cx + q * math.cos(a), cy + q * math.sin(a)) for q, a in corners], fill=c)
    else:
        d.pieslice(box, 180, 360, fill=c)
    return np.asarray(img)


def generated_images(n, image_size, seed=0):
    """n deterministic images -> (uint8 (n, 3, R, R), long (n,)), labels cycling the classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % NUM_GENERATED_CLASSES
    imgs = np.stack([_draw(int(k), image_size, rng) for k in labels])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long()


@torch.no_grad()
def posterior(vae, images, out, device, batch=64):
    """SD-VAE posterior of uint8 images (N, 3, R, R) into out (N, 8, R/8, R/8): mean | std."""
    for i in tqdm(range(0, len(images), batch), desc="SD-VAE posterior"):
        x = torch.from_numpy(np.asarray(images[i:i + batch])).to(device).float() / 127.5 - 1
        mean, std = vae.encode(x)
        out[i:i + batch] = torch.cat([mean, std], 1).cpu().numpy()
    return out


def class_files(folder):
    """Class folders -> (class names, [(file, label)]): sorted names are labels 0..C-1."""
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    return classes, [(os.path.join(folder, c, f), i) for i, c in enumerate(classes)
                     for f in sorted(os.listdir(os.path.join(folder, c)))]


def prepare(data_path, out, image_size, vae, vae_name, device):
    """Class folders -> out/ images.npy (N, 3, R, R) uint8, labels, latents; meta.json last."""
    classes, files = class_files(data_path)
    at = lambda name: os.path.join(out, name)
    shape, labels = (len(files), 3, image_size, image_size), []
    if files:
        os.makedirs(out, exist_ok=True)
        imgs = np.lib.format.open_memmap(at("images.tmp.npy"), "w+", np.uint8, shape)
    for path, label in tqdm(files, desc=f"preparing {data_path}"):
        try:
            imgs[len(labels)] = center_crop(open_rgb(path), image_size).transpose(2, 0, 1)
            labels.append(label)
        except ValueError as e:
            tqdm.write(f"skipping unreadable image {e}", file=sys.stderr)
    if not labels:  # else an empty set would be "prepared" and kept
        raise SystemExit(f"no readable images under {data_path}: expected one sub-folder of "
                         "images per class")
    n, r = len(labels), image_size // 8
    np.save(at("labels.npy"), np.array(labels, dtype=np.int64))
    if vae is not None:
        latents = np.lib.format.open_memmap(at("latents.npy"), "w+", np.float32, (n, 8, r, r))
        posterior(vae, imgs[:n], latents, device).flush()
    if n == len(files):  # nothing skipped: the written file is the array (meta.json marks done)
        os.replace(at("images.tmp.npy"), at("images.npy"))
    else:  # a copy without the skipped slots at the end (ImageNet: minutes)
        kept = np.lib.format.open_memmap(at("images.npy"), "w+", np.uint8, (n, *shape[1:]))
        for i in tqdm(range(0, n, 4096), "writing images.npy"):
            kept[i:i + 4096] = imgs[i:min(i + 4096, n)]
        del kept
        os.remove(at("images.tmp.npy"))
    del imgs
    with open(at("meta.tmp.json"), "w") as f:
        json.dump({"source": os.path.abspath(data_path), "image_size": image_size,
                   "vae": vae_name, "classes": classes}, f)
    os.replace(at("meta.tmp.json"), at("meta.json"))


def prepared_folder(data_path, image_size, vae_name, run_dir, prepared_dir):
    """--prepared-dir, else a folder beside the run folder's; one holding other data: refused."""
    tag = "" if vae_name is None else "-" + os.path.splitext(os.path.basename(vae_name))[0]
    tag += "-vae" if vae_name == "random" else ""
    name = f"prepared-{os.path.basename(os.path.normpath(data_path))}-{image_size}{tag}"
    folder = prepared_dir or os.path.join(os.path.dirname(os.path.abspath(run_dir)), name)
    if not os.path.exists(os.path.join(folder, "meta.json")):  # not prepared (to the end) yet
        return folder
    meta = json.load(open(os.path.join(folder, "meta.json")))
    held = f"{meta['source']} at {meta['image_size']} px"
    want = f"{os.path.abspath(data_path)} at {image_size} px"
    if held == want and vae_name and meta.get("vae") != vae_name:
        held = f"latents of the VAE {meta['vae']}" if meta.get("vae") else "no VAE latents"
        want = f"{vae_name}'s"
    if held != want:
        raise SystemExit(f"{folder} holds {held}, not {want}: pass another --prepared-dir")
    return folder


def prepared_arrays(data_path, folder, image_size, vae, vae_name, device, rank, world):
    """Memory-mapped (images, labels, latents or None); rank 0 prepares them, the others wait."""
    if rank == 0 and not os.path.exists(os.path.join(folder, "meta.json")):
        prepare(data_path, folder, image_size, vae, vae_name, device)
    if world > 1:
        dist.barrier()
    at = lambda name: os.path.join(folder, name)
    latents = np.load(at("latents.npy"), mmap_mode="r") if vae is not None else None
    return np.load(at("images.npy"), mmap_mode="r"), np.load(at("labels.npy")), latents


class Batches(torch.utils.data.Dataset):
    """Item s: this rank's part of batch s; order seeded by (seed, epoch), flips by (seed, step)."""
    def __init__(self, images, labels, latents, global_batch, rank, world, seed, flip):
        self.images, self.labels, self.latents = images, labels, latents
        self.n, self.B, self.b, self.rank = len(labels), global_batch, global_batch // world, rank
        self.seed, self.flip = seed, flip
        self._epoch, self._perm = None, None  # made on first use (ImageNet: 1.28M)

    def __getitem__(self, step):
        epoch, i = divmod(step, self.n // self.B)  # whole global batches per epoch
        if self._epoch != epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng((self.seed, epoch)).permutation(self.n)
        idx = np.sort(self._perm[i * self.B + self.rank * self.b:][:self.b])
        take = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a[idx]))
        x = take(self.images)
        if self.flip:
            coins = np.random.default_rng((self.seed, 1, step)).random(self.B)
            flips = torch.from_numpy(coins[self.rank * self.b:][:self.b] < 0.5)
            x[flips] = x[flips].flip(-1)
        return x, take(self.labels), take(self.latents)


def setup_device():
    """(device, rank, world size) of a plain run or a torchrun process; TF32 matmuls on GPU."""
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        return device, dist.get_rank(), dist.get_world_size()
    return device, 0, 1


def find_checkpoint(path):
    """A checkpoint file, or the newest checkpoints/*.pt of a run (a killed write's *.tmp: no)."""
    found = glob.glob(os.path.join(path, "checkpoints", "*.pt"))
    if not found and not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file, nor a run folder with checkpoints/*.pt")
    return max(found, default=path)


def checksum(value, h=None):
    """sha256 of keys and plain values by repr, each tensor's dtype, shape and bytes (~1 GB/s)."""
    h = hashlib.sha256() if h is None else h
    if isinstance(value, torch.Tensor):
        h.update(f"{value.dtype}{tuple(value.shape)}".encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    elif isinstance(value, (dict, list, tuple)):
        for k, v in value.items() if isinstance(value, dict) else enumerate(value):
            h.update(repr(k).encode())
            checksum(v, h)
    else:
        h.update(repr(value).encode())
    return h.hexdigest()


def read_weights(path, flag, mmap=False):
    """A .safetensors or torch file as data, its checksum checked; else a ValueError of one line."""
    why = "damaged: its contents differ from their checksum"
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        mmap = mmap and zipfile.is_zipfile(path)  # files of torch < 1.6: read whole
        with torch.serialization.safe_globals([argparse.Namespace]):  # official files' args
            w = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        if not isinstance(w, dict):  # a bare tensor or list: no names to load by
            why = f"holds a {type(w).__name__}, not named tensors"
        elif (saved := w.pop("checksum", None)) is None or saved == checksum(w):  # None: old
            return w  # runs' and official files
    except Exception as e:  # truncated, not a torch file, or a pickle that is more than data
        code = re.search(r"GLOBAL ([\w.]+)", str(e))  # what the file would call on loading
        why = ("no such file" if not os.path.isfile(path) else
               f"refused: it holds {code[1]}, which loading would run as code" if code else
               "not a file torch can read as weights")
    raise ValueError(f"{flag} {path}: {why}") from None


MISFITS = {  # torch's many-line load_state_dict error -> the first key of each kind
    r'Missing key\(s\) in state_dict: "(.*?)"': "missing key {}",
    r'Unexpected key\(s\) in state_dict: "(.*?)"': "unexpected key {}",
    r"size mismatch for (\S+): .*?(\[.*?\]).*?(\[.*?\])": "{} is {} in the file, {} expected",
    r"^'(.*)'$": "missing key {}",  # a KeyError: a conversion (encoders.py) found no such key
}


@contextlib.contextmanager
def fitting(path, flag):
    """Strict loads inside: a key or shape of `path` that does not fit: a ValueError of one line."""
    try:
        yield
    except (KeyError, RuntimeError) as e:  # else: the error's first line
        why = "; ".join(say.format(*m.groups()) for pattern, say in MISFITS.items()
                        if (m := re.search(pattern, str(e))))
        raise ValueError(f"{flag} {path} does not fit: {why or str(e).splitlines()[0]}") from None


def sampling_weights(path, ema):
    """(weights, settings) of ours or an official SiT/REPA/iREPA/JiT file (EMA: 'model_ema1')."""
    ckpt = read_weights(path, "--ckpt")
    key = ("ema" if "ema" in ckpt else "model_ema1") if ema else "model"
    a = ckpt.get("args") or {}
    a = a if isinstance(a, dict) else vars(a)
    saved = {k: a.get(k) for k in ("model", "vae_weights", "vae_stats", "noise_scale", "objective")}
    saved["image_size"] = a.get("image_size") or a.get("resolution") or a.get("img_size") or 256
    saved["num_classes"] = a.get("num_classes") or a.get("class_num") or 1000
    if "vae" in ckpt:  # REPA-E: the run's tuned VAE and EMA BatchNorm (--vae-weights overrides)
        bn = ckpt.get("ema_bn") or {k[3:]: v for k, v in ckpt["ema"].items()
                                    if k.startswith("bn.")}  # official: inside the EMA SiT
        saved.update(vae_weights=None, vae_stats=None, tuned_vae=(ckpt["vae"], bn))
    weights = {k.removeprefix("net."): v for k, v in ckpt.get(key, {}).items()}
    unused = lambda k: (k.startswith(("projectors.", "bn."))  # bn.*: official REPA-E's latent BN
                        or k.endswith(("freqs_cos", "freqs_sin")))
    return {k: v for k, v in weights.items() if not unused(k)}, saved


def readable_checkpoint(path, flag="--resume"):
    """(file, checkpoint memory-mapped) of a file or a run's newest; damaged: names a good one."""
    path = os.path.abspath(find_checkpoint(path))
    older = sorted(f for f in glob.glob(os.path.join(os.path.dirname(path), "*.pt")) if f < path)
    for f in [path, *reversed(older)]:  # older ones only where the newest is damaged
        with contextlib.suppress(ValueError):  # unreadable
            ck = read_weights(f, flag, mmap=True)
            if isinstance(ck, dict) and {"args", "step", "model"} <= set(ck):
                break
    else:
        f = None
    if f == path:
        return path, ck
    good = f"; the newest good one is {f}: pass {flag} {f}" if f else ""
    raise ValueError(f"{path} is not a readable train.py checkpoint (damaged?){good}")


def save_checkpoint(state, path):
    """Atomic (a killed write leaves the previous one), with a checksum checked on loading."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({**state, "checksum": checksum(state)}, path + ".tmp")
    os.replace(path + ".tmp", path)


def write_shards(out, n, shard_size, settings, make_shard, grid, rank, world):
    """n samples of make_shard(s) -> (uint8 (b, H, W, 3), (b,)) into out, via out.shards/."""
    folder, num_shards = out + ".shards", math.ceil(n / shard_size)
    at = lambda s: os.path.join(folder, f"{s:06d}.npz")
    settings = json.loads(json.dumps(settings))  # as read back: lists, not tuples
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "settings.json")
        old = json.load(open(path)) if os.path.exists(path) else settings
        if old != settings:  # the flags that differ, as --flag value (the shards') pairs
            differ = ", ".join(f"--{k.replace('_', '-')} {old.get(k)}"
                               for k in sorted(old | settings) if old.get(k) != settings.get(k))
            raise SystemExit(f"{folder} holds shards made with {differ}: rerun with those, or "
                             "pass another --out")
        with open(path, "w") as f:
            json.dump(settings, f, sort_keys=True)
    todo = [s for s in range(num_shards) if not os.path.exists(at(s))]
    if world > 1:  # every rank lists the same missing shards before any is written
        dist.barrier()
    for s in tqdm(todo[rank::world], f"{len(todo)} of {num_shards} shards", disable=rank != 0):
        images, labels = make_shard(s)
        np.savez(at(s)[:-4] + ".tmp.npz", images=images.numpy(), labels=labels.numpy())
        os.replace(at(s)[:-4] + ".tmp.npz", at(s))  # a shard file is whole or absent
    if world > 1:
        dist.barrier()
    if rank == 0:
        shards = [np.load(at(s)) for s in range(num_shards)]
        images, labels = (np.concatenate([sh[k] for sh in shards]) for k in ("images", "labels"))
        if out.endswith(".npz"):
            np.savez(out, arr_0=images, arr_1=labels)
        if grid or out.endswith(".png"):
            save_grid(images[:grid or n], out[:-4] + ".png")
        shutil.rmtree(folder)
        print(f"wrote {out}: {images.shape[0]} images {images.shape[1:]}")


class Parser(argparse.ArgumentParser):
    """Errors in one line ending in "see --help"; no abbreviations (train.py's resume)."""
    def __init__(self, description):
        super().__init__(description=description, allow_abbrev=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def at_least(least, kind=int):
    """An argparse type: a number of `kind` not below `least`, checked while parsing."""
    def parse(text):
        if kind(text) < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {text}")
        return kind(text)
    parse.__name__ = kind.__name__  # argparse's "invalid int value" names the type by this
    return parse


def check_writable(parser, outputs):
    """argparse error unless every given output (flag, path) is new and its folder writable: a
    file a user made is never overwritten."""
    for flag, path in outputs:
        if not path:  # not asked for
            continue
        if os.path.exists(path):
            parser.error(f"{path} exists already: pass another {flag} (or move it away)")
        folder = os.path.dirname(os.path.abspath(path))
        if not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            parser.error(f"{flag} {path}: its folder does not exist or is not writable")
