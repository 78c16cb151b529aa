"""
ADM-exact FID, sFID, Inception Score, precision and recall in PyTorch: the numbers of OpenAI's guided-diffusion
evaluator (evaluations/evaluator.py, TensorFlow) from the 2015-12-05 FID Inception ported to torch.

  python fid.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz [--json metrics.json]
  python fid.py samples_png_dir/ --ref stats.npz          # folder of PNGs; a stats-only ref (mu, sigma) gives IS, FID
  python fid.py samples.npz --save-stats stats.npz        # mu, sigma, mu_s, sigma_s of a batch
  torchrun --nproc_per_node=8 fid.py samples.npz --ref REF.npz   # feature extraction sharded over GPUs
Weights: --inception PATH, else pt_inception-2015-12-05-6726825d.pth or weights-inception-2015-12-05-6726825d.pth
in the torch hub cache (~/.cache/torch/hub/checkpoints/); --download fetches the pytorch-fid release file.
"""
import argparse
import json
import os
import struct
import warnings
import zipfile
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg
from scipy.special import log_softmax
from PIL import Image
from tqdm import tqdm

WEIGHT_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
WEIGHT_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHT_FILES[0]


# ---- the 2015-12-05 FID Inception (torchvision module names, so the published PyTorch weights load strictly) ----

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


POOLS = {"avg": lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False),  # TF: padded zeros not averaged
         "max": lambda x: F.max_pool2d(x, 3, 1, 1), "max/2": lambda x: F.max_pool2d(x, 3, 2)}
ROW, COL = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))  # 7x7 factorised into 1x7 and 7x1: (kernel, stride, padding)


class Mixed(nn.Module):
    """An Inception block: branches concatenated on channels. A branch is a chain of steps, each a conv (name, cin,
    cout, kernel, stride=1, padding=0), a list of convs on one input concatenated (Mixed_7b/c), or a POOLS key."""

    def __init__(self, *branches):
        super().__init__()
        self.branches = [[[s] if isinstance(s, tuple) else s for s in chain] for chain in branches]
        for step in (s for chain in self.branches for s in chain if isinstance(s, list)):
            for name, *conv in step:
                self.add_module(name, BasicConv2d(*conv))

    def forward(self, x):
        outs = []
        for chain in self.branches:
            y = x
            for step in chain:
                if isinstance(step, str):
                    y = POOLS[step](y)
                else:
                    y = torch.cat([getattr(self, name)(y) for name, *_ in step], 1)
            outs.append(y)
        return torch.cat(outs, 1)


def _block_a(cin, pool_ch):
    return Mixed([("branch1x1", cin, 64, 1)], [("branch5x5_1", cin, 48, 1), ("branch5x5_2", 48, 64, 5, 1, 2)],
                 [("branch3x3dbl_1", cin, 64, 1), ("branch3x3dbl_2", 64, 96, 3, 1, 1),
                  ("branch3x3dbl_3", 96, 96, 3, 1, 1)], ["avg", ("branch_pool", cin, pool_ch, 1)])


def _block_c(c7):
    return Mixed([("branch1x1", 768, 192, 1)],
                 [("branch7x7_1", 768, c7, 1), ("branch7x7_2", c7, c7, *ROW), ("branch7x7_3", c7, 192, *COL)],
                 [("branch7x7dbl_1", 768, c7, 1), ("branch7x7dbl_2", c7, c7, *COL),
                  ("branch7x7dbl_3", c7, c7, *ROW), ("branch7x7dbl_4", c7, c7, *COL),
                  ("branch7x7dbl_5", c7, 192, *ROW)], ["avg", ("branch_pool", 768, 192, 1)])


def _block_e(cin, pool):
    fork = lambda a, b: [(a, 384, 384, (1, 3), 1, (0, 1)), (b, 384, 384, (3, 1), 1, (1, 0))]
    return Mixed([("branch1x1", cin, 320, 1)], [("branch3x3_1", cin, 384, 1), fork("branch3x3_2a", "branch3x3_2b")],
                 [("branch3x3dbl_1", cin, 448, 1), ("branch3x3dbl_2", 448, 384, 3, 1, 1),
                  fork("branch3x3dbl_3a", "branch3x3dbl_3b")], [pool, ("branch_pool", cin, 192, 1)])


@contextmanager
def strict_fp32(device_type):
    """fp32 as the TF reference, whatever the caller set: no autocast, no TF32 (restored on exit)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tf1_resize(x, size=299):
    """TF1's legacy ResizeBilinear (align_corners=False, half_pixel_centers=False, no antialias), as in the 2015
    graph: source coordinate = dst * (in/out) in float32, interpolate along W, then H. (B,C,H,W) float32."""
    for dim in (3, 2):
        n = x.shape[dim]
        src = torch.arange(size, dtype=torch.float32, device=x.device) * (torch.tensor(n, dtype=torch.float32) / size)
        lo = src.floor()
        w = (src - lo).view([size if d == dim else 1 for d in range(4)])
        a, b = x.index_select(dim, lo.long()), x.index_select(dim, (lo.long() + 1).clamp(max=n - 1))
        x = a + (b - a) * w
    return x


class FIDInception(nn.Module):
    """forward(uint8 (B,H,W,3) NHWC at native size) -> pool3 (B,2048), sFID features (B,2023) = Mixed_6d's first
    1x1 branch after BN+ReLU, channels 0..6, flattened in H,W,C order, and unbiased logits (B,1008) (no fc bias)."""

    def __init__(self):
        super().__init__()
        stem = [("Conv2d_1a_3x3", 3, 32, 3, 2), ("Conv2d_2a_3x3", 32, 32, 3), ("Conv2d_2b_3x3", 32, 64, 3, 1, 1),
                ("Conv2d_3b_1x1", 64, 80, 1), ("Conv2d_4a_3x3", 80, 192, 3)]  # max-pools after 2b and 4a
        for name, *conv in stem:
            self.add_module(name, BasicConv2d(*conv))
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _block_a(192, 32), _block_a(256, 64), _block_a(288, 64)
        self.Mixed_6a = Mixed([("branch3x3", 288, 384, 3, 2)], [("branch3x3dbl_1", 288, 64, 1),
                              ("branch3x3dbl_2", 64, 96, 3, 1, 1), ("branch3x3dbl_3", 96, 96, 3, 2)], ["max/2"])
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (_block_c(c7) for c7 in (128, 160, 160, 192))
        self.Mixed_7a = Mixed([("branch3x3_1", 768, 192, 1), ("branch3x3_2", 192, 320, 3, 2)],
                              [("branch7x7x3_1", 768, 192, 1), ("branch7x7x3_2", 192, 192, *ROW),
                               ("branch7x7x3_3", 192, 192, *COL), ("branch7x7x3_4", 192, 192, 3, 2)], ["max/2"])
        self.Mixed_7b, self.Mixed_7c = _block_e(1280, "avg"), _block_e(2048, "max")
        self.fc = nn.Linear(2048, 1008)
        for m in self.modules():  # He init keeps random-weight activations O(1) (tests); weights replace it
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x):
        with strict_fp32(x.device.type):
            x = (tf1_resize(x.permute(0, 3, 1, 2).contiguous().float()) - 128) / 128  # (B,3,299,299)
            for name, m in list(self.named_children())[:-1]:  # every layer but fc
                x = m(x)
                if name == "Mixed_6d":  # sFID features: channels 0..6 of its first branch (1x1), which come first
                    spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)  # (B,17*17*7) in TF's NHWC order
                if name in ("Conv2d_2b_3x3", "Conv2d_4a_3x3"):
                    x = F.max_pool2d(x, 3, 2)
            pool = x.mean((2, 3))  # (B,2048) pool_3: 8x8 average
            return pool, spatial, pool @ self.fc.weight.T


def load_inception(path=None, download=False, device="cpu"):
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    if path is None:
        path = next((p for f in WEIGHT_FILES if os.path.exists(p := os.path.join(hub, f))),
                    os.path.join(hub, WEIGHT_FILES[0]))
        if download and not os.path.exists(path):
            os.makedirs(hub, exist_ok=True)
            torch.hub.download_url_to_file(WEIGHT_URL, path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"FID Inception weights not found ({path}): pass --inception PATH, put "
                                f"{WEIGHT_FILES[0]} or {WEIGHT_FILES[1]} in {hub}, or use --download ({WEIGHT_URL})")
    model = FIDInception()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    # files saved before BatchNorm counted batches lack num_batches_tracked; it is unused in eval mode
    model.load_state_dict({**{k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}, **sd})
    return model.eval().requires_grad_(False).to(device)


# ---- metrics, with the semantics of ADM's evaluator ----

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    mu1, mu2, sigma1, sigma2 = np.atleast_1d(mu1), np.atleast_1d(mu2), np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # the product is singular: retry on slightly regularised covariances
        warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonals")
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.abs(covmean.imag).max()} in sqrtm")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, split_size=5000):
    """exp(E_x KL(p(y|x) || p(y))) over 1008-way softmaxes, averaged over consecutive splits of split_size."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64), axis=1)  # (N,1008)
    scores = []
    for i in range(0, len(logp), split_size):
        part = logp[i:i + split_size]
        kl = np.exp(part) * (part - np.log(np.exp(part).mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def _sqdist(u, v):
    """ADM's DistanceBlock: squared distances |u|^2 - 2 u.v + |v|^2 in fp16 (every op rounded to fp16, sums in fp32
    as on the GPU), the whole block again in fp32 if any fp16 value overflowed. (n,D), (m,D) -> (n,m) fp32."""
    h = lambda t: t.half().float()
    u16, v16 = h(u), h(v)
    nu, nv = h(h(u16 * u16).sum(1)), h(h(v16 * v16).sum(1))  # (n,), (m,)
    d = h(h(nu[:, None] - h(2 * h(u16 @ v16.T))) + nv[None]).clamp_min(0)
    if torch.isfinite(d).all():  # fp16 values are exact in TF32 too; the fp32 retry is not
        return d
    with strict_fp32(u.device.type):
        return ((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None]).clamp_min(0)


def _radii(feats, k, batch):
    """k-th nearest-neighbour squared distance of every row, self excluded (index k of the sorted row incl. self)."""
    if len(feats) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images per set, got {len(feats)}")
    blocks = range(0, len(feats), batch)
    return torch.cat([torch.cat([_sqdist(feats[i:i + batch], feats[j:j + batch]) for j in blocks], 1)
                      .topk(k + 1, dim=1, largest=False).values[:, k] for i in blocks])


def precision_recall(ref_feats, sample_feats, k=3, batch=10000):
    """Improved precision (samples inside some reference k-NN ball) and recall (references inside some sample
    k-NN ball), on squared distances, in blocks of batch x batch. (N,D) float32 tensors -> (precision, recall)."""
    r_ref, r_smp = _radii(ref_feats, k, batch), _radii(sample_feats, k, batch)
    ref_in, smp_in = (torch.zeros(len(f), dtype=torch.bool, device=f.device) for f in (ref_feats, sample_feats))
    for i in range(0, len(ref_feats), batch):
        for j in range(0, len(sample_feats), batch):
            d = _sqdist(ref_feats[i:i + batch], sample_feats[j:j + batch])  # (ref block, sample block)
            ref_in[i:i + batch] |= (d <= r_smp[None, j:j + batch]).any(1)
            smp_in[j:j + batch] |= (d <= r_ref[i:i + batch, None]).any(0)
    return smp_in.double().mean().item(), ref_in.double().mean().item()


# ---- images in, features out ----

def read_png(path):
    """An 8-bit RGB image file as uint8 (H, W, 3), or a ValueError naming the file."""
    try:
        im = Image.open(path)
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # convert("RGB") would clip these to white
            raise ValueError(f"{im.mode} pixels (16-bit or float): convert the file to 8-bit")
        return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{path}: {e}") from None


def open_images(path):
    """((N,H,W,3), read(start, end, batch) -> iterator of uint8 (b,H,W,3) arrays) for a folder of PNGs or an npz's
    arr_0, which is streamed from its zip member (50K images never sit in memory)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(".png"))
        if not files:
            raise ValueError(f"{path}: folder holds no .png files")
        shape = read_png(files[0]).shape

        def read(start, end, batch):
            for i in range(start, end, batch):
                imgs = [read_png(f) for f in files[i:min(i + batch, end)]]
                if any(im.shape != shape for im in imgs):
                    raise ValueError(f"{path}: PNGs differ in size (first is {shape})")
                yield np.stack(imgs)
        return (len(files), *shape), read
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: " + ("neither a folder of PNGs nor an .npz (np.savez) file" if os.path.exists(path)
                                        else "no such file or folder"))
    with zipfile.ZipFile(path) as z:
        if "arr_0.npy" not in z.namelist():
            raise ValueError(f"{path}: no arr_0 in the npz (holds {[n[:-4] for n in z.namelist()]})")
        info = z.getinfo("arr_0.npy")
        with z.open(info) as f:
            fmt = np.lib.format  # header format 1.0, or 2.0 (3.0: UTF-8 text) when it exceeds 64 KiB
            read_header = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()  # of the array data inside the .npy member
    if len(shape) != 4 or shape[3] != 3:
        hint = " (looks NCHW: transpose to NHWC)" if len(shape) == 4 and shape[1] == 3 else ""
        raise ValueError(f"{path}: arr_0 must be [N,H,W,3] NHWC images, got shape {tuple(shape)}{hint}")
    if dtype != np.uint8 or fortran:
        raise ValueError(f"{path}: arr_0 must be C-ordered uint8 in 0..255, got {dtype} (from [-1,1] floats: "
                         "((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8))")
    if info.compress_type == zipfile.ZIP_STORED:  # np.savez: memory-map the raw bytes (no CRC pass, O(1) seeks)
        with open(path, "rb") as f:
            f.seek(info.header_offset + 26)  # zip local header: name and extra-field lengths, then the data
            name_len, extra_len = struct.unpack("<HH", f.read(4))
        data = np.memmap(path, np.uint8, "r", info.header_offset + 30 + name_len + extra_len + offset, shape)
        return shape, lambda start, end, batch: (data[i:min(i + batch, end)] for i in range(start, end, batch))

    def read(start, end, batch):  # np.savez_compressed: decompress in order (seek reads up to start)
        item = int(np.prod(shape[1:]))  # bytes per image
        with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
            f.seek(offset + start * item)
            for i in range(start, end, batch):
                n = min(batch, end - i)
                yield np.frombuffer(f.read(n * item), np.uint8).reshape(n, *shape[1:])
    return shape, read


@torch.no_grad()
def features(model, path, batch_size=250, device="cpu"):
    """pool3 (N,2048) and sFID (N,2023) float32 features and the image shape. Under torchrun each rank takes a
    contiguous shard; rank 0 gathers all in order and gets numpy arrays, the others (None, None, shape)."""
    shape, read = open_images(path)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n, per = shape[0], -(-shape[0] // world)
    start, end = min(rank * per, n), min(rank * per + per, n)
    out = torch.zeros(per, 2048 + 2023, device=device)  # same size on every rank for gather
    top = torch.zeros((), dtype=torch.int64, device=device)  # the brightest pixel value seen
    zero_one = ValueError(f"{path}: pixel values are all 0 or 1; images must be uint8 in 0..255, not [0,1]")
    for i, batch in enumerate(tqdm(read(start, end, batch_size), total=-(-(end - start) // batch_size),
                                   desc=os.path.basename(path.rstrip("/")), disable=rank != 0)):
        if i == 0 and batch.max() == 1:  # fail fast; an all-black first batch is legal and checked at the end
            raise zero_one
        x = torch.from_numpy(batch.copy())
        x = x.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else x
        top = torch.maximum(top, x.max())
        out[i * batch_size:i * batch_size + len(x)] = torch.cat(model(x)[:2], 1)
    if world > 1:
        dist.all_reduce(top, dist.ReduceOp.MAX)
        parts = [torch.empty_like(out) for _ in range(world)] if rank == 0 else None
        dist.gather(out, parts, dst=0)
        out = torch.cat(parts) if rank == 0 else None  # only the last non-empty shard is partial
    if top <= 1:
        raise zero_one
    if rank != 0:
        return None, None, shape
    out = out[:n].cpu().numpy()
    return out[:, :2048], out[:, 2048:], shape


def statistics(pool, spatial):
    return {"mu": pool.mean(0, dtype=np.float64), "sigma": np.cov(pool, rowvar=False),
            "mu_s": spatial.mean(0, dtype=np.float64), "sigma_s": np.cov(spatial, rowvar=False)}


def read_ref(ref):
    """(names in the reference npz, its stored statistics); a ValueError if it is unusable."""
    if not zipfile.is_zipfile(ref):
        raise ValueError(f"--ref {ref}: " + ("not an .npz (np.savez) file" if os.path.exists(ref) else "no such file"))
    with np.load(ref) as z:  # stored statistics win over ones recomputed from arr_0, as in ADM
        files, stats = z.files, {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in z.files}
    if "arr_0" not in files and not {"mu", "sigma"} <= set(stats):
        raise ValueError(f"reference {ref} holds {files}; it needs arr_0 (reference images) or mu and sigma")
    return files, stats


def evaluate(model, samples, ref=None, batch_size=250, device="cpu"):
    """ADM's five numbers for samples against ref, and the samples' statistics. Every rank calls it; rank 0 gets
    (metrics dict, stats dict), the others (None, None). A stats-only ref gives IS, FID (and sFID with mu_s)."""
    ref_files, ref_stats = read_ref(ref) if ref else ([], {})
    pool, spatial, shape = features(model, samples, batch_size, device)
    r_pool, r_spatial, r_shape = features(model, ref, batch_size, device) if "arr_0" in ref_files else [None] * 3
    if pool is None:
        return None, None
    for name, s in ((samples, shape), (ref, r_shape)):
        if s is not None and s[0] < 2:  # a covariance needs two images (sqrtm of a NaN matrix hangs)
            raise ValueError(f"{name}: {s[0]} image(s); FID statistics need at least 2")
    if abs(shape[0] - 50000) > 5000:
        warnings.warn(f"{samples}: {shape[0]} images; FID is biased by sample count and papers use 50,000")
    if r_shape is not None and r_shape[1:3] != shape[1:3]:
        warnings.warn(f"resolution mismatch: samples {shape[1]}x{shape[2]}, reference {r_shape[1]}x{r_shape[2]}")
    stats = statistics(pool, spatial)
    metrics = {"Inception Score": inception_score(pool @ model.fc.weight.detach().T.cpu().numpy())}
    if r_pool is not None and len(ref_stats) < 4:
        ref_stats = {**statistics(r_pool, r_spatial), **ref_stats}
    for name, mu, sigma in (("FID", "mu", "sigma"), ("sFID", "mu_s", "sigma_s")):  # a ref always has mu, sigma
        if mu in ref_stats and sigma in ref_stats:
            metrics[name] = frechet_distance(stats[mu], stats[sigma], ref_stats[mu], ref_stats[sigma])
    if r_pool is not None:
        metrics["Precision"], metrics["Recall"] = precision_recall(torch.from_numpy(r_pool).to(device),
                                                                   torch.from_numpy(pool).to(device))
    return metrics, stats


def main(argv=None):
    p = argparse.ArgumentParser(description="ADM-exact FID, sFID, Inception Score, precision and recall")
    p.add_argument("samples", help="samples: .npz with arr_0 uint8 [N,H,W,3], or a folder of PNGs")
    p.add_argument("--ref", help="reference batch .npz: arr_0 reference images and/or mu, sigma (mu_s, sigma_s)")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--save-stats", help="write mu, sigma, mu_s, sigma_s of the samples' features to this .npz")
    p.add_argument("--inception", help="Inception weights file (default: torch hub cache)")
    p.add_argument("--download", action="store_true", help="download the Inception weights if they are not cached")
    p.add_argument("--batch-size", type=int, default=250, help="images per Inception forward (per GPU)")
    args = p.parse_args(argv)
    if not (args.ref or args.save_stats):
        p.error("give --ref and/or --save-stats")
    for flag, path in (("--json", args.json), ("--save-stats", args.save_stats)):
        if path and not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
            p.error(f"{flag} {path}: its folder does not exist or is not writable")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    device, world = torch.device("cpu"), int(os.environ.get("WORLD_SIZE", 1))  # torchrun: one process per GPU
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:  # bad samples, reference or weights: the message, not a traceback
        n = open_images(args.samples)[0][0]  # the samples and the reference are checked before the weights load
        read_ref(args.ref) if args.ref else None
        if n < 2048:
            warnings.warn(f"{args.samples}: {n} images, fewer than the 2,048 Inception features: the covariance is "
                          "singular and FID is not meaningful (papers use 50,000)")
        metrics, stats = evaluate(load_inception(args.inception, args.download, device), args.samples, args.ref,
                                  args.batch_size, device)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    if metrics is not None:
        if args.save_stats:
            np.savez(args.save_stats, **stats)
        for name, value in metrics.items():
            print(f"{name}: {value}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**metrics, "samples": args.samples, "ref": args.ref}, f, indent=2)
    if world > 1:
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
