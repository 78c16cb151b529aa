"""ADM-exact FID, sFID, Inception Score, precision and recall: OpenAI's guided-diffusion evaluator
(TensorFlow) ported to torch with the 2015-12-05 FID Inception. Standalone: copy it alone.

  python fid.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz [--json metrics.json]
  python fid.py samples.npz --save-stats s.npz  # no --ref: IS; a stats-only --ref (mu, sigma): FID
"""
import argparse
import json
import os
import re
import warnings
import zipfile
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from numpy.lib import format as npy
from scipy import linalg
from scipy.special import log_softmax
from tqdm import tqdm

WEIGHT_FILES = ("pt_inception-2015-12-05-6726825d.pth",
                "weights-inception-2015-12-05-6726825d.pth")
WEIGHT_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


AVG = lambda x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)  # TF's: pads not counted
MAX = lambda x: F.max_pool2d(x, 3, 1, 1)
MAX2 = lambda x: F.max_pool2d(x, 3, 2)
ROW, COL = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))  # 1x7 and 7x1: kernel, stride, padding


class Mixed(nn.Module):
    """An Inception block: chains of convs, pools or lists of convs on one input, concatenated."""

    def __init__(self, *branches):
        super().__init__()
        self.branches = [[[s] if isinstance(s, tuple) else s for s in chain] for chain in branches]
        for step in (s for chain in self.branches for s in chain if isinstance(s, list)):
            for name, *conv in step:
                self.add_module(name, BasicConv2d(*conv))

    def branch(self, chain, y):
        for step in chain:
            y = step(y) if callable(step) else torch.cat([getattr(self, n)(y) for n, *_ in step], 1)
        return y

    def forward(self, x):
        return torch.cat([self.branch(chain, x) for chain in self.branches], 1)


def _block_a(cin, pool_ch):
    return Mixed([("branch1x1", cin, 64, 1)],
                 [("branch5x5_1", cin, 48, 1), ("branch5x5_2", 48, 64, 5, 1, 2)],
                 [("branch3x3dbl_1", cin, 64, 1), ("branch3x3dbl_2", 64, 96, 3, 1, 1),
                  ("branch3x3dbl_3", 96, 96, 3, 1, 1)],
                 [AVG, ("branch_pool", cin, pool_ch, 1)])


def _block_c(c7):
    return Mixed([("branch1x1", 768, 192, 1)],
                 [("branch7x7_1", 768, c7, 1), ("branch7x7_2", c7, c7, *ROW),
                  ("branch7x7_3", c7, 192, *COL)],
                 [("branch7x7dbl_1", 768, c7, 1), ("branch7x7dbl_2", c7, c7, *COL),
                  ("branch7x7dbl_3", c7, c7, *ROW), ("branch7x7dbl_4", c7, c7, *COL),
                  ("branch7x7dbl_5", c7, 192, *ROW)],
                 [AVG, ("branch_pool", 768, 192, 1)])


def _block_e(cin, pool):
    fork = lambda a, b: [(a, 384, 384, (1, 3), 1, (0, 1)), (b, 384, 384, (3, 1), 1, (1, 0))]
    return Mixed([("branch1x1", cin, 320, 1)],
                 [("branch3x3_1", cin, 384, 1), fork("branch3x3_2a", "branch3x3_2b")],
                 [("branch3x3dbl_1", cin, 448, 1), ("branch3x3dbl_2", 448, 384, 3, 1, 1),
                  fork("branch3x3dbl_3a", "branch3x3dbl_3b")],
                 [pool, ("branch_pool", cin, 192, 1)])


@contextmanager
def strict_fp32(device_type):
    """fp32 as in TF, whatever the caller set: no autocast, no TF32 (restored on exit)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tf1_resize(x, size=299):
    """TF1's legacy bilinear resize of (B, C, H, W): source = dst * (in / out) in float32."""
    for dim in (3, 2):
        n = x.shape[dim]
        step = torch.tensor(n, dtype=torch.float32) / size
        src = torch.arange(size, dtype=torch.float32, device=x.device) * step
        lo = src.floor()
        w = (src - lo).view([size if d == dim else 1 for d in range(4)])
        a = x.index_select(dim, lo.long())
        b = x.index_select(dim, (lo.long() + 1).clamp(max=n - 1))
        x = a + (b - a) * w
    return x


class FIDInception(nn.Module):
    """uint8 (B, H, W, 3) -> pool3 (B, 2048), sFID features (B, 2023), logits (B, 1008)."""

    def __init__(self):
        super().__init__()
        stem = [("Conv2d_1a_3x3", 3, 32, 3, 2), ("Conv2d_2a_3x3", 32, 32, 3),
                ("Conv2d_2b_3x3", 32, 64, 3, 1, 1), ("Conv2d_3b_1x1", 64, 80, 1),
                ("Conv2d_4a_3x3", 80, 192, 3)]
        for name, *conv in stem:
            self.add_module(name, BasicConv2d(*conv))
        self.Mixed_5b = _block_a(192, 32)
        self.Mixed_5c = _block_a(256, 64)
        self.Mixed_5d = _block_a(288, 64)
        self.Mixed_6a = Mixed([("branch3x3", 288, 384, 3, 2)],
                              [("branch3x3dbl_1", 288, 64, 1), ("branch3x3dbl_2", 64, 96, 3, 1, 1),
                               ("branch3x3dbl_3", 96, 96, 3, 2)], [MAX2])
        for name, c7 in zip(["Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"], [128, 160, 160, 192]):
            self.add_module(name, _block_c(c7))
        self.Mixed_7a = Mixed([("branch3x3_1", 768, 192, 1), ("branch3x3_2", 192, 320, 3, 2)],
                              [("branch7x7x3_1", 768, 192, 1), ("branch7x7x3_2", 192, 192, *ROW),
                               ("branch7x7x3_3", 192, 192, *COL),
                               ("branch7x7x3_4", 192, 192, 3, 2)], [MAX2])
        self.Mixed_7b = _block_e(1280, AVG)
        self.Mixed_7c = _block_e(2048, MAX)
        self.fc = nn.Linear(2048, 1008)
        for m in self.modules():  # He init: O(1) activations without weights
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x):
        with strict_fp32(x.device.type):
            x = (tf1_resize(x.permute(0, 3, 1, 2).contiguous().float()) - 128) / 128
            for name, m in list(self.named_children())[:-1]:  # every layer but fc
                x = m(x)
                if name == "Mixed_6d":  # sFID: its first branch's channels 0..6
                    spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)  # (B, 17*17*7)
                if name in ("Conv2d_2b_3x3", "Conv2d_4a_3x3"):
                    x = MAX2(x)
            pool = x.mean((2, 3))  # (B, 2048) pool_3: the 8x8 average
            return pool, spatial, pool @ self.fc.weight.T  # no fc bias, as in ADM


MISFITS = {  # torch's many-line load_state_dict error -> the first key of each kind
    r'Missing key\(s\) in state_dict: "(.*?)"': "missing key {}",
    r'Unexpected key\(s\) in state_dict: "(.*?)"': "unexpected key {}",
    r"size mismatch for (\S+): .*?(\[.*?\]).*?(\[.*?\])": "{} is {} in the file, {} expected",
}


def load_inception(path=None, download=False, device="cpu"):
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    if path is None:
        cached = [os.path.join(hub, f) for f in WEIGHT_FILES]
        path = next((p for p in cached if os.path.exists(p)), cached[0])
        if download and not os.path.exists(path):
            os.makedirs(hub, exist_ok=True)
            torch.hub.download_url_to_file(WEIGHT_URL + WEIGHT_FILES[0], path)
    model = FIDInception()
    counters = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" in k}
    try:  # as data, never as code
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd if isinstance(sd, dict) else {}  # a bare tensor or list: every key is missing
        model.load_state_dict({**counters, **sd})  # older files lack BN's counters
    except Exception as e:  # one line: missing, unreadable, or its misfits
        why = "; ".join(say.format(*m.groups()) for pattern, say in MISFITS.items()
                        if (m := re.search(pattern, str(e))))
        why = f" does not fit: {why}" if why else ": not a file torch can read as weights"
        if not os.path.isfile(path):
            why = f": no such file; put {' or '.join(WEIGHT_FILES)} in {hub} or use --download"
        raise ValueError(f"--inception {path}{why}") from None
    return model.eval().requires_grad_(False).to(device)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # singular: retry, regularised
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
    """exp(E_x KL(p(y|x) || p(y))), the mean over consecutive splits."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64), axis=1)  # (N, 1008)
    scores = []
    for i in range(0, len(logp), split_size):
        part = logp[i:i + split_size]
        kl = np.exp(part) * (part - np.log(np.exp(part).mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def _sqdist(u, v):
    """ADM's DistanceBlock (n, D), (m, D) -> (n, m): every op in fp16, or fp32 on overflow."""
    h = lambda t: t.half().float()
    u16, v16 = h(u), h(v)
    nu, nv = h(h(u16 * u16).sum(1)), h(h(v16 * v16).sum(1))  # (n,), (m,)
    d = h(h(nu[:, None] - h(2 * h(u16 @ v16.T))) + nv[None]).clamp_min(0)
    if torch.isfinite(d).all():  # fp16 values are exact in TF32; fp32 ones are not
        return d
    with strict_fp32(u.device.type):
        return ((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None]).clamp_min(0)


def _radii(feats, k, batch):
    blocks = range(0, len(feats), batch)
    rows = []
    for i in blocks:
        d = torch.cat([_sqdist(feats[i:i + batch], feats[j:j + batch]) for j in blocks], 1)
        rows.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # 0 is itself
    return torch.cat(rows)


def precision_recall(ref_feats, sample_feats, k=3, batch=10000):
    """Shares of samples inside some reference's k-NN ball, and of references in a sample's."""
    r_ref, r_smp = _radii(ref_feats, k, batch), _radii(sample_feats, k, batch)
    ref_in = torch.zeros_like(r_ref, dtype=torch.bool)
    smp_in = torch.zeros_like(r_smp, dtype=torch.bool)
    for i in range(0, len(ref_feats), batch):
        for j in range(0, len(sample_feats), batch):
            d = _sqdist(ref_feats[i:i + batch], sample_feats[j:j + batch])  # (ref, sample)
            ref_in[i:i + batch] |= (d <= r_smp[None, j:j + batch]).any(1)
            smp_in[j:j + batch] |= (d <= r_ref[i:i + batch, None]).any(0)
    return smp_in.double().mean().item(), ref_in.double().mean().item()


def open_images(path, flag=""):
    """((N, H, W, 3), read(start, end, batch) -> uint8 arrays) of an npz's arr_0, from the zip."""
    shape, why = (0,), None
    z = zipfile.ZipFile(path) if zipfile.is_zipfile(path) else None
    if z is None:
        why = "not an .npz file" if os.path.exists(path) else "no such file"
    elif "arr_0.npy" not in z.namelist():
        why = f"no arr_0 in the npz (holds {[n[:-4] for n in z.namelist()]})"
    else:
        info = z.getinfo("arr_0.npy")
        f = z.open(info)
        v1 = npy.read_magic(f) == (1, 0)  # header format 1.0, or 2.0 when it exceeds 64 KiB
        shape, fortran, dtype = (npy.read_array_header_1_0 if v1 else npy.read_array_header_2_0)(f)
        if len(shape) != 4 or shape[3] != 3 or dtype != np.uint8 or fortran:
            why = f"arr_0 must be C-ordered uint8 [N,H,W,3], not NCHW; got {dtype} {shape}"
    if not why and shape[0] < 4:  # precision/recall's k=3 neighbours need 4
        why = f"{shape[0]} image(s); the statistics need at least 4"
    if why:
        raise ValueError(f"{flag} {path}: {why}".lstrip())
    offset, item = f.tell(), int(np.prod(shape[1:]))  # data start; bytes per image
    if info.compress_type == zipfile.ZIP_STORED:  # np.savez: memory-map the data in place
        lengths = np.fromfile(path, "<u2", 2, offset=info.header_offset + 26)  # name, extra field
        start = info.header_offset + 30 + int(lengths.sum()) + offset  # after the zip's header
        data = np.memmap(path, np.uint8, "r", start, shape)
        get = lambda i, j: data[i:j]
    else:
        def get(i, j):  # np.savez_compressed: decompressed in order; a seek back starts over
            f.seek(offset + i * item)
            return np.frombuffer(f.read((j - i) * item), np.uint8).reshape(j - i, *shape[1:])
    return shape, lambda start, end, b: (get(i, min(i + b, end)) for i in range(start, end, b))


@torch.no_grad()
def features(model, path, batch_size=250, device="cpu"):
    """pool3 (N, 2048), sFID (N, 2023) features, shape."""
    shape, read = open_images(path)
    n = shape[0]
    out = torch.zeros(n, 2048 + 2023, device=device)
    top = torch.zeros((), dtype=torch.int64, device=device)  # the brightest pixel seen
    bar = tqdm(read(0, n, batch_size), total=-(-n // batch_size),
               desc=os.path.basename(path))
    for i, batch in enumerate(bar):
        x = torch.from_numpy(batch.copy()).to(device)
        top = torch.maximum(top, x.max())
        if i == 0 and top == 1:  # [0, 1] images: refused below
            break
        out[i * batch_size:i * batch_size + len(x)] = torch.cat(model(x)[:2], 1)
    if top <= 1:  # all-black first images are legal: this waits for the brightest pixel
        raise ValueError(f"{path}: pixels all 0 or 1; need uint8 in 0..255, not [0,1]")
    out = out.cpu().numpy()
    return out[:, :2048], out[:, 2048:], shape


def statistics(pool, spatial):
    return {"mu": pool.mean(0, dtype=np.float64), "sigma": np.cov(pool, rowvar=False),
            "mu_s": spatial.mean(0, dtype=np.float64), "sigma_s": np.cov(spatial, rowvar=False)}


def read_ref(ref):
    """(its stored statistics, which win as in ADM; whether its images are needed)."""
    stats, names = {}, []
    if zipfile.is_zipfile(ref):
        with np.load(ref) as z:
            names, stats = z.files, {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in z}
    for k, v in stats.items():  # checked before the samples' features, not after
        if v.shape[-1] != (2023 if k.endswith("_s") else 2048):
            raise ValueError(f"--ref {ref}: its {k} is {v.shape}, not of ADM's Inception features")
    images = "arr_0" in names or not {"mu", "sigma"} <= set(stats)
    if images:
        open_images(ref, "--ref")  # refused here if it holds none
    return stats, images


def evaluate(model, samples, ref=None, batch_size=250, device="cpu"):
    """(metrics, the samples' statistics)."""
    r_stats, r_imgs = read_ref(ref) if ref else ({}, False)
    pool, spatial, shape = features(model, samples, batch_size, device)
    r_pool, r_spatial, r_shape = features(model, ref, batch_size, device) if r_imgs else [None] * 3
    if r_shape is not None and r_shape[1:3] != shape[1:3]:
        warnings.warn(f"resolution mismatch: samples {shape[1:3]}, reference {r_shape[1:3]}")
    stats = statistics(pool, spatial)
    metrics = {"Inception Score": inception_score(pool @ model.fc.weight.detach().T.cpu().numpy())}
    if r_pool is not None and len(r_stats) < 4:
        r_stats = {**statistics(r_pool, r_spatial), **r_stats}
    for name, mu, sigma in (("FID", "mu", "sigma"), ("sFID", "mu_s", "sigma_s")):
        if mu in r_stats and sigma in r_stats:
            metrics[name] = frechet_distance(stats[mu], stats[sigma], r_stats[mu], r_stats[sigma])
    if r_pool is not None:
        r_feats, feats = torch.from_numpy(r_pool).to(device), torch.from_numpy(pool).to(device)
        metrics["Precision"], metrics["Recall"] = precision_recall(r_feats, feats)
    return metrics, stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.error = lambda message: p.exit(2, f"{p.prog}: {message} (see --help)\n")  # one line
    add = p.add_argument
    add("samples", help=".npz with arr_0 uint8 [N,H,W,3]")
    add("--ref", help=".npz with arr_0 images and/or mu, sigma (mu_s, sigma_s)")
    add("--json", help="also write the metrics to this file")
    add("--save-stats", type=lambda f: f if f.endswith(".npz") else f + ".npz",  # as np.savez
        help="write the samples' statistics to this .npz")
    add("--inception", help="Inception weights file (default: torch hub cache)")
    add("--download", action="store_true", help="download the weights if not cached")
    add("--batch-size", type=int, default=250, help="images per forward")
    args = p.parse_args(argv)
    outputs = {"--json": args.json, "--save-stats": args.save_stats}
    taken = [f"{path} exists already: pass another {flag}" for flag, path in outputs.items()
             if path and os.path.exists(path)]  # a file a user made is never overwritten
    why = taken + [f"{flag} {path}: its folder is not writable" for flag, path in outputs.items()
                   if path and not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK)]
    if why or args.batch_size < 1:
        p.error(why[0] if why else "--batch-size must be at least 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    try:  # bad inputs or weights: one line, no traceback
        n = open_images(args.samples)[0][0]  # checked before the weights load
        if args.ref:
            read_ref(args.ref)
        if abs(n - 50000) > 5000:
            warnings.warn(f"{n} images; FID is biased (papers use 50,000) and void under 2,048")
        model = load_inception(args.inception, args.download, device)
        metrics, stats = evaluate(model, args.samples, args.ref, args.batch_size, device)
    except (ValueError, OSError) as e:
        p.error(str(e))
    if args.save_stats:
        np.savez(args.save_stats, **stats)
    print("\n".join(f"{name}: {value}" for name, value in metrics.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**metrics, "samples": args.samples, "ref": args.ref}, f, indent=2)


if __name__ == "__main__":
    main()
