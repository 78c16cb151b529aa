"""Spatial structure of frozen encoders' patch tokens (iREPA): LDS, CDS, SRSS, RMSC as means over
images, the paper's cosine-map picture (raw vs spatially normalised), Pearson r with gFID.

  python metrics.py --encoder dinov2-vit-b --encoder-weights random --num-images 1000
  python metrics.py --encoder dinov2-vit-b mae-vit-l --images DIR --masks DIR --save m.csv
  python metrics.py --encoder dinov2-vit-b mae-vit-l --num-images 16 --viz viz.png
  python metrics.py --fid-table fid.csv --images DIR --masks DIR   # the table's rows as encoders
"""
import csv
import functools
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy.stats import pearsonr
from tqdm import tqdm

from align import spatial_norm
from encoders import ENCODERS, load_encoder
from data import (Parser, at_least, center_crop, check_writable, class_files, generated_images,
                  open_rgb)

METRICS = ("lds", "cds", "srss", "rmsc")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def grid_side(T):
    """H of the H x H grid of T tokens: every encoder's, fed square images."""
    H = math.isqrt(T)
    if H * H != T:
        raise ValueError(f"{T} tokens are not a square grid")
    return H


@functools.lru_cache(maxsize=8)
def _pairs(H, device):
    # distance d of every token pair (T, T), row-major; its one-hot (T, T, K); counts (K,)
    y, x = torch.arange(H).repeat_interleave(H), torch.arange(H).repeat(H)
    dist = ((y[:, None] - y).abs() + (x[:, None] - x).abs()).to(device)
    onehot = F.one_hot(dist).float()
    return dist, onehot, onehot.sum((0, 1)).double()


def spatial_metrics(z, masks=None, paper=False):
    """Per image {metric: (B,)} of tokens z (B, T, D) on an H x H grid, d = Manhattan distance.
    LDS: mean cos at d = 1 - at d >= 6 (paper=True, appendix B: d < H/2 - d >= H/2). CDS: minus
    the slope of mean cos vs d = 1..8. RMSC: sqrt(mean_t |u_t - mean u|^2) of unit tokens u.
    SRSS, masks (B, T) True = foreground: mean over foreground tokens of (mean cos to foreground
    4-neighbours - to background tokens at d >= 6)."""
    H = grid_side(z.shape[1])
    z = z.float()  # fp32 as the official code
    n = z.norm(dim=-1).clamp(min=1e-8)  # (B, T): dividing the Gram by it spares a copy of z
    G = (z @ z.transpose(1, 2)).div_(n[:, :, None]).div_(n[:, None, :])  # cos (B, T, T)
    dist, onehot, counts = _pairs(H, G.device)
    # sum of cos per distance d = 0..2H-2 (B, K): fp32 per row, fp64 over rows
    sums = torch.einsum("bts,tsk->tbk", G, onehot).double().sum(0)
    near, far = (slice(1, H // 2), slice(H // 2, None)) if paper else (slice(1, 2), slice(6, None))
    far_mean = sums[:, far].sum(1) / counts[far].sum().clamp(min=1)
    lds = sums[:, near].sum(1) / counts[near].sum() - far_mean
    d = torch.arange(1, min(8, len(counts) - 1) + 1, device=G.device)
    sim = sums[:, d] / counts[d]  # mean cos at distance d = 1..8 (B, 8)
    dc = d - d.double().mean()  # centred d (8,)
    cds = -((sim - sim.mean(1, keepdim=True)) @ dc) / (dc @ dc)
    # mean_t |u_t|^2 - |mean_t u_t|^2 = mean over pairs of G_tt - G_ts: identical tokens give 0
    rmsc = (G.diagonal(dim1=1, dim2=2)[..., None] - G).mean((1, 2)).clamp(min=0).sqrt()
    out = {"lds": lds.float(), "cds": cds.float(), "rmsc": rmsc}
    if masks is None:
        return out
    fg = masks.to(G.device).bool()  # (B, T)
    pos, neg = (dist == 1).float(), (dist >= 6).float()  # (T, T)
    pos_sum = ((G * pos) @ fg.float()[..., None])[..., 0]  # (B, T) per anchor token
    neg_sum = ((G * neg) @ (~fg).float()[..., None])[..., 0]
    pos_n, neg_n = fg.float() @ pos, (~fg).float() @ neg
    valid = fg & (pos_n > 0) & (neg_n > 0)
    delta = pos_sum / pos_n.clamp(min=1) - neg_sum / neg_n.clamp(min=1)
    return {**out, "srss": (delta * valid).sum(1) / valid.sum(1)}  # NaN without a valid anchor


def load_folder(images, masks=None, n=None):
    """The first n readable images (N, 3, 256, 256) of a flat folder or else of its class folders
    (train.py's order), centre-cropped; masks of a flat folder: bool (N, 256, 256) or None."""
    is_image = lambda p: p.suffix.lower() in IMAGE_SUFFIXES  # no stat per file: ImageNet has 1.28M
    flat = sorted(filter(is_image, Path(images).iterdir()))
    files = flat or [Path(f) for f, _ in class_files(images)[1] if is_image(Path(f))]
    by_name = {p.stem: p for p in filter(is_image, Path(masks).iterdir())} if masks and flat else {}
    x, m, why = [], [], None
    bar = tqdm(total=min(n or len(files), len(files)), desc="images")
    for f in files:
        if len(x) == n:
            break
        try:
            img = open_rgb(f)
        except ValueError as e:  # e: "PATH: why"
            tqdm.write(f"skipping unreadable image {e}", file=sys.stderr)
            continue
        bar.update()
        x.append(center_crop(img, 256))
        if masks:
            mask = by_name.get(f.stem)
            mask = mask and Image.open(mask).convert("L").point(lambda v: 255 * (v > 0))
            if mask is None or mask.size != img.size:
                why = f"--masks {masks}: no mask of the name and size of image {f.name} {img.size}"
                break
            m.append(center_crop(mask, 256) >= 128)
    bar.close()
    if not x:
        why = f"no readable image in {images} ({len(files)} {'/'.join(IMAGE_SUFFIXES)} files)"
    if why:
        raise ValueError(why)
    x = torch.from_numpy(np.stack(x)).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.stack(m)) if masks else None


@torch.no_grad()
def score_encoder(name, encoder, images, masks, args, device):
    """Means {row: {metric: mean}} of raw and spatially normalised tokens; image 0's tokens."""
    scores, first, gamma = {}, None, args.spnorm_gamma
    for i in tqdm(range(0, len(images), args.batch_size), desc=name):
        z = encoder(images[i:i + args.batch_size].to(device))  # (B, T, D)
        m = None  # (B, T): any foreground pixel counts
        if masks is not None:
            m = masks[i:i + len(z), None].to(device).float()
            m = F.adaptive_max_pool2d(m, grid_side(z.shape[1])).flatten(1) > 0
        rows = {name: z}
        if gamma is not None:
            rows[f"{name} +spnorm({gamma})"] = spatial_norm(z, gamma)
        for row, zz in rows.items():
            for k, v in spatial_metrics(zz, m, args.lds == "paper").items():
                scores.setdefault(row, {}).setdefault(k, []).append(v.cpu())
        first = z[0].cpu() if first is None else first
    means = {row: {k: torch.nanmean(torch.cat(v)).item() for k, v in s.items()}
             for row, s in scores.items()}
    return means, first


def colour(v):
    """[0, 1] -> uint8 RGB (..., 3), linear between five viridis colours."""
    viridis = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]]
    stops = np.linspace(0, 1, len(viridis))
    return np.stack([np.interp(v, stops, c) for c in np.transpose(viridis)], -1).astype(np.uint8)


def draw_viz(path, image, tokens, gamma, H, cell=112):
    """A row per encoder of tokens {name: (T, D)} on an H x H grid: the image, then per red point
    the cosine map of the raw tokens, then of the spatially normalised ones; one colour scale."""
    top, P = 20, 4
    points = [(H // 2, H // 2), (H // 4, H // 4), (H // 4, 3 * H // 4), (3 * H // 4, H // 3)]

    def cos(z):  # (P, H, H): each point's cosine to every token
        u = F.normalize(z.float(), dim=-1)
        return (u[[r * H + c for r, c in points]] @ u.T).view(P, H, H)
    maps = {n: torch.cat([cos(z), cos(spatial_norm(z[None], gamma)[0])]) for n, z in tokens.items()}
    picture = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((cell, cell), Image.BICUBIC)
    lo = min(m.min().item() for m in maps.values())
    hi = max(m.max().item() for m in maps.values())
    cx = lambda k: 120 + (k + 1) * (cell + 4) + 16 * (k >= P)  # x of map column k
    canvas = Image.new("RGB", (cx(2 * P) + 60, top + len(maps) * (cell + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((cx(0), 4), "raw tokens: cosine to the red point", fill="black")
    draw.text((cx(P), 4), f"after spatial normalisation (gamma={gamma})", fill="black")
    for row, (name, m) in enumerate(maps.items()):
        y = top + row * (cell + 4)
        draw.text((4, y + cell // 2), name, fill="black")
        canvas.paste(picture, (120, y))
        for k, sim in enumerate(m):
            heat = Image.fromarray(colour(((sim - lo) / (hi - lo)).numpy()))
            canvas.paste(heat.resize((cell, cell), 0), (cx(k), y))
            px = cx(k) + (points[k % P][1] + 0.5) * cell / H
            py = y + (points[k % P][0] + 0.5) * cell / H
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill="red", outline="white")
    bar = colour(np.linspace(1, 0, canvas.height - top - 24)[:, None].repeat(12, 1))
    canvas.paste(Image.fromarray(bar), (cx(2 * P), top + 12))
    draw.text((cx(2 * P) + 14, top), f"{hi:.2f}", fill="black")
    draw.text((cx(2 * P) + 14, canvas.height - 14), f"{lo:.2f}", fill="black")
    canvas.save(path)


def read_fid_table(path):
    """Rows {encoder, gfid[, linear_probe]} of a CSV file."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    try:
        ok = bool(rows) and {"encoder", "gfid"} <= set(rows[0])
        [float(r[k]) for r in rows for k in ("gfid", "linear_probe") if k in r]
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"--fid-table {path}: need header encoder,gfid[,linear_probe] and numbers")
    return rows


def fid_correlations(rows, means):
    """({column: (Pearson r with gFID, values)} over the encoders in rows and means, the gFIDs)."""
    rows = [r for r in rows if r["encoder"] in means]
    gfid = [float(r["gfid"]) for r in rows]
    scored = means[rows[0]["encoder"]]
    cols = {m.upper(): [means[r["encoder"]][m] for r in rows] for m in METRICS if m in scored}
    if "linear_probe" in rows[0]:
        cols["linear probe"] = [float(r["linear_probe"]) for r in rows]
    return {c: (float(pearsonr(x, gfid)[0]), x) for c, x in cols.items()}, gfid


def draw_scatter(path, corr, gfid, size=240, pad=36):
    """A panel per column: gFID against it, its least-squares line and r."""
    canvas, y = Image.new("RGB", (size * len(corr), size), "white"), np.asarray(gfid, float)
    draw = ImageDraw.Draw(canvas)
    to = lambda v, lo, hi, a, b: a + (v - lo) / max(hi - lo, 1e-12) * (b - a)
    for k, (name, (r, x)) in enumerate(corr.items()):
        x, x0 = np.asarray(x, float), k * size
        px = lambda v: to(v, x.min(), x.max(), x0 + pad, x0 + size - 14)
        py = lambda v: to(v, y.min(), y.max(), size - pad, 26)
        draw.rectangle([x0 + pad - 8, 18, x0 + size - 6, size - pad + 8], outline="black")
        a, b = np.polyfit(x, y, 1)
        line = [px(x.min()), py(a * x.min() + b), px(x.max()), py(a * x.max() + b)]
        draw.line(line, fill=(231, 76, 60), width=2)
        for u, v in zip(px(x), py(y)):
            draw.ellipse([u - 4, v - 4, u + 4, v + 4], fill=(52, 152, 219), outline="black")
        draw.text((x0 + pad, 4), f"{name}: r = {r:+.3f}", fill="black")
        span = f"{name}  {x.min():.3g} .. {x.max():.3g}"
        draw.text((x0 + pad, size - pad + 12), span, fill="black")
        for text, ty in ((f"{y.max():.3g}", 20), ("gFID", size // 2 - 12),
                         (f"{y.min():.3g}", size - pad - 6)):
            draw.text((x0 + 2, ty), text, fill="black")
    canvas.save(path)


def main(argv=None):
    p = Parser(__doc__)
    add = p.add_argument
    add("--encoder", nargs="+", help="default: the --fid-table rows; of " + " ".join(ENCODERS))
    add("--encoder-weights", nargs="+", help="file or 'random': one for all or one per encoder")
    add("--images", help="flat or class folders (default: generated shapes)")
    add("--masks", help="SRSS masks of flat --images: same file names, non-zero = foreground")
    add("--num-images", type=at_least(1), default=1000, help="the first readable ones are scored")
    add("--batch-size", type=at_least(1), default=100, help="images per encoder forward")
    add("--lds", choices=("code", "paper"), default="code",
        help="near vs far: d = 1 vs d >= 6 (official code), d < H/2 vs d >= H/2 (appendix B)")
    add("--spnorm-gamma", type=float, help="also score spatially normalised tokens (0.6, 0.8)")
    add("--save", help="write the table to this .csv or .json file")
    add("--viz", help="PNG of the first image's cosine maps")
    add("--fid-table", help="CSV encoder,gfid[,linear_probe]: Pearson r with gFID, and a plot")
    args = p.parse_args(argv)
    scatter = args.fid_table and Path(args.fid_table).with_suffix(".pearson.png")
    check_writable(p, [("--save", args.save), ("--viz", args.viz), ("--fid-table", scatter)])
    gamma, device = args.spnorm_gamma, "cuda" if torch.cuda.is_available() else "cpu"
    try:  # bad files or weights, a token grid that does not fit: one line
        fid_rows = read_fid_table(args.fid_table) if args.fid_table else []
        names = args.encoder or [r["encoder"] for r in fid_rows]
        weights = args.encoder_weights or [None]
        weights = weights * len(names) if len(weights) == 1 else weights
        unknown = [n for n in names if n not in ENCODERS]
        in_table = {r["encoder"] for r in fid_rows} & set(names)
        for bad, message in [  # refused before the run
            (not names, "give --encoder NAME [NAME ...] (or --fid-table)"),
            (unknown, f"unknown encoder(s) {' '.join(unknown)}; known: {' '.join(ENCODERS)}"),
            (len(weights) != len(names), "--encoder-weights: give one value or one per encoder"),
            (args.masks and not args.images, "--masks needs --images"),
            (not math.isfinite(gamma or 0), f"--spnorm-gamma must be a number, got {gamma}"),
            (args.save and not args.save.endswith((".csv", ".json")),
             f"--save {args.save}: must end in .csv or .json"),
            (args.fid_table and len(in_table) < 3, "--fid-table: need >= 3 of the scored encoders"),
            *[(w not in (None, "random") and not Path(w).is_file(),
               f"--encoder-weights {w}: no such file") for w in weights],
        ]:
            if bad:
                p.error(message)
        if args.images:
            images, masks = load_folder(args.images, args.masks, args.num_images)
        else:
            images, masks = generated_images(args.num_images, 256)[0], None
        means, first = {}, {}
        for name, w in zip(names, weights):
            encoder = load_encoder(name, resolution=images.shape[-1], weights=w).to(device)
            m, first[name] = score_encoder(name, encoder, images, masks, args, device)
            means.update(m)
            for row, v in m.items():  # at once: a later encoder's missing weights lose nothing
                tqdm.write(f"{row}: " + ", ".join(f"{k.upper()} {x:.4f}" for k, x in v.items()))
    except (ValueError, OSError, RuntimeError) as e:
        p.error(str(e))
    cols = [m for m in METRICS if m in means[names[0]]]
    table = [["encoder", *cols]] + [[row, *(v[c] for c in cols)] for row, v in means.items()]
    print(f"\n{len(images)} images, LDS definition '{args.lds}', mean over images")
    for row in table:
        cells = (f"{c:10.4f}" if isinstance(c, float) else f"{c.upper():>10}" for c in row[1:])
        print(row[0].ljust(max(map(len, means)) + 2) + "".join(cells))
    if masks is None:
        print("SRSS omitted: it needs foreground masks (--images DIR --masks DIR)")
    elif any(math.isnan(v["srss"]) for v in means.values()):
        print("SRSS nan: are the masks all one value? (no valid anchor token)")
    if args.save and args.save.endswith(".json"):
        result = {"num_images": len(images), "lds": args.lds, "means": means}
        Path(args.save).write_text(json.dumps(result, indent=2))
    elif args.save:
        Path(args.save).write_text("".join(",".join(map(str, row)) + "\n" for row in table))
    if args.viz:
        gamma = 0.6 if gamma is None else gamma
        draw_viz(args.viz, images[0], first, gamma, grid_side(len(first[names[0]])))
    if args.fid_table:
        corr, gfid = fid_correlations(fid_rows, means)
        print(f"\nPearson r with gFID ({len(gfid)} encoders):",
              *(f"{c} {r:+.3f}" for c, (r, _) in corr.items()))
        draw_scatter(scatter, corr, gfid)


if __name__ == "__main__":
    main()
