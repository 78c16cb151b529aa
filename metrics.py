"""
Spatial structure of a frozen encoder's patch tokens (iREPA): LDS, CDS, SRSS, RMSC averaged over images,
the paper's cosine self-similarity picture (raw vs spatially normalised), and the Pearson correlation of
each metric with gFID across encoders.

  python metrics.py --encoder dinov2-vit-b --encoder-weights random --num-images 1000
  python metrics.py --encoder dinov2-vit-b mae-vit-l --images DIR --masks DIR --spnorm-gamma 0.6 --csv m.csv --json m.json
  python metrics.py --encoder dinov2-vit-b mae-vit-l --num-images 16 --viz viz.png
  python metrics.py --fid-table fid.csv --images DIR --masks DIR     (encoders = the table's rows)
"""
import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy.stats import pearsonr
from tqdm import tqdm

from align import spatial_norm
from encoders import ENCODERS, load_encoder
from train import generated_images

METRICS = ("lds", "cds", "srss", "rmsc")

# -----------------------------------------------------------------------------
# metrics on patch tokens z (B, T, D) of an H x W grid; d = Manhattan distance between two tokens

def token_grid(T, grid=None):
    """(H, W) of the token grid: sqrt(T) x sqrt(T) unless grid is given."""
    H, W = grid or (math.isqrt(T), math.isqrt(T))
    if H * W != T:
        raise ValueError(f"{T} tokens do not form a {H}x{W} grid" if grid else
                         f"{T} tokens are not a square grid; give its shape (grid=(H, W), --grid HxW)")
    return H, W

def _distances(H, W):
    y, x = torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)  # row-major token positions
    return (y[:, None] - y).abs() + (x[:, None] - x).abs()  # (T, T)

def _unit(z):
    return F.normalize(z.float(), dim=-1, eps=1e-8)  # (B, T, D), fp32 like the official code

def _cos_by_distance(z, grid):
    """Sum of cos over the ordered token pairs at each distance d = 0..H+W-2 per image (B, K), and pair counts (K,)."""
    u = _unit(z)
    onehot = F.one_hot(_distances(*token_grid(z.shape[1], grid)).flatten()).to(u)  # (T*T, K)
    return (u @ u.transpose(1, 2)).flatten(1) @ onehot, onehot.sum(0)  # one matmul instead of K masked means

def lds(z, grid=None, paper=False):
    """Local-vs-distant similarity: mean cos of near token pairs minus mean cos of far pairs, per image (B,).
    Default = official code: near = 4-neighbours (d = 1), far = d >= 6.
    paper=True = paper appendix B: r_near = r_far = H/2, near = 0 < d < H/2, far = d >= H/2."""
    sums, counts = _cos_by_distance(z, grid)
    r = token_grid(z.shape[1], grid)[0] // 2
    near, far = (slice(1, r), slice(r, None)) if paper else (slice(1, 2), slice(6, None))
    return sums[:, near].sum(1) / counts[near].sum() - sums[:, far].sum(1) / counts[far].sum().clamp(min=1)

def cds(z, grid=None, dmax=8):
    """Correlation-decay slope: minus the least-squares slope of mean cos at distance d against d = 1..dmax, per image (B,)."""
    sums, counts = _cos_by_distance(z, grid)
    d = torch.arange(1, min(dmax, len(counts) - 1) + 1, device=sums.device)
    sim, dc = sums[:, d] / counts[d], d - d.float().mean()  # (B, dmax), (dmax,)
    return -((sim - sim.mean(1, keepdim=True)) @ dc) / (dc @ dc)

def srss(z, masks, grid=None, far=6):
    """Semantic-region self-similarity, a mask-aware LDS, per image (B,): for each foreground anchor token, mean cos to
    its foreground 4-neighbours minus mean cos to background tokens at d >= far, averaged over the anchors that have
    both. masks (B, T): True = foreground. NaN for an image without such an anchor."""
    B, T, _ = z.shape
    if tuple(masks.shape) != (B, T):
        raise ValueError(f"masks must hold one foreground flag per token, shape {(B, T)}, got {tuple(masks.shape)}")
    u, dist = _unit(z), _distances(*token_grid(T, grid)).to(z.device)
    fg = masks.to(z.device).bool()
    G = u @ u.transpose(1, 2)  # (B, T, T)
    near, away = (dist == 1).float(), (dist >= far).float()  # (T, T), symmetric
    pos_sum, pos_n = (G * near) @ fg.float()[..., None], fg.float() @ near  # (B, T, 1), (B, T) per anchor
    neg_sum, neg_n = (G * away) @ (~fg).float()[..., None], (~fg).float() @ away
    valid = fg & (pos_n > 0) & (neg_n > 0)
    delta = pos_sum[..., 0] / pos_n.clamp(min=1) - neg_sum[..., 0] / neg_n.clamp(min=1)  # (B, T)
    return (delta * valid).sum(1) / valid.sum(1)  # 0/0 = NaN for an image without valid anchors

def rmsc(z):
    """RMS spatial contrast: sqrt(mean_t ||u_t - mean_t u||^2) of the unit tokens, per image (B,)."""
    u = _unit(z)
    return (u - u.mean(1, keepdim=True)).square().sum(-1).mean(1).sqrt()

def spatial_metrics(z, masks=None, grid=None, paper=False):
    """All metrics of a batch as {name: (B,)}; SRSS only with masks (B, T)."""
    out = {"lds": lds(z, grid, paper), "cds": cds(z, grid), "rmsc": rmsc(z)}
    return out if masks is None else {**out, "srss": srss(z, masks, grid)}

# -----------------------------------------------------------------------------
# images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

def center_crop(img, size):
    """ADM's crop: halve with a box filter while the short side >= 2*size, bicubic to short side = size, centre crop."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), Image.BICUBIC)
    x, y = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((x, y, x + size, y + size)))

def load_folder(images, masks=None, n=None, size=256):
    """First n images of a folder by name, centre-cropped: uint8 (N, 3, size, size); and with a mask folder (same file
    name stem, any non-zero pixel = foreground, cropped like its image) bool masks (N, size, size), else None."""
    files = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
    if not files:
        raise ValueError(f"no images ({' '.join(IMAGE_SUFFIXES)}) in {images}")
    mask_files = {p.stem: p for p in Path(masks).iterdir()} if masks else {}
    x, m = [], []
    for f in tqdm(files, desc="images"):
        img = Image.open(f)
        x.append(center_crop(img.convert("RGB"), size))
        if masks:
            if f.stem not in mask_files:
                raise ValueError(f"no mask for image {f.name} in {masks} (masks are matched to images by file name stem)")
            mask = Image.open(mask_files[f.stem]).convert("L").point(lambda v: 255 * (v > 0))
            if mask.size != img.size:
                raise ValueError(f"mask {mask_files[f.stem].name} is {mask.size[0]}x{mask.size[1]}, image {f.name} is {img.size[0]}x{img.size[1]}")
            m.append(center_crop(mask, size) >= 128)
    return torch.from_numpy(np.stack(x)).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(np.stack(m)) if masks else None

# -----------------------------------------------------------------------------
# scoring, pictures, correlation with gFID

@torch.no_grad()
def score_encoder(name, weights, images, masks, args, device):
    """Per-image metrics {row: {metric: (N,)}} of one encoder, raw and (--spnorm-gamma) spatially normalised;
    and the first image's tokens (T, D) for --viz."""
    encoder = load_encoder(name, resolution=images.shape[-1], weights=weights).to(device)
    scores, first = {}, None
    for i in tqdm(range(0, len(images), args.batch_size), desc=name):
        z = encoder(images[i:i + args.batch_size].to(device))  # (B, T, D)
        grid = token_grid(z.shape[1], args.grid)
        m = None if masks is None else F.adaptive_max_pool2d(masks[i:i + len(z), None].float().to(device), grid).flatten(1) > 0
        rows = {name: z} if args.spnorm_gamma is None else {name: z, f"{name} +spnorm({args.spnorm_gamma})": spatial_norm(z, args.spnorm_gamma)}
        for row, zz in rows.items():
            for k, v in spatial_metrics(zz, m, args.grid, args.lds == "paper").items():
                scores.setdefault(row, {}).setdefault(k, []).append(v.cpu())
        first = z[0].cpu() if first is None else first
    return {row: {k: torch.cat(v) for k, v in s.items()} for row, s in scores.items()}, first

VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)

def colour(v):
    """Values in [0, 1] -> uint8 RGB, piecewise linear through five viridis colours."""
    x = np.clip(v, 0, 1) * (len(VIRIDIS) - 1)
    i = np.minimum(x.astype(int), len(VIRIDIS) - 2)
    return (VIRIDIS[i] * (1 - (x - i)[..., None]) + VIRIDIS[i + 1] * (x - i)[..., None]).astype(np.uint8)

def similarity_maps(z, points, grid):
    """Cosine of every token to each reference token (row, col): z (T, D) -> (P, H, W)."""
    u = _unit(z)
    return (u[[r * grid[1] + c for r, c in points]] @ u.T).view(len(points), *grid)

def draw_viz(path, image, tokens, gamma, grid, cell=112):
    """One row per encoder: the image, then per reference point the cosine map of the raw tokens, then of the
    spatially normalised ones; one colour scale (bar on the right); reference points as red dots."""
    (H, W), top, left = grid, 20, 120
    points = [(H // 2, W // 2), (H // 4, W // 4), (H // 4, 3 * W // 4), (3 * H // 4, W // 3)]
    maps = {n: torch.cat([similarity_maps(z, points, grid), similarity_maps(spatial_norm(z[None], gamma)[0], points, grid)])
            for n, z in tokens.items()}
    lo, hi = min(m.min().item() for m in maps.values()), max(m.max().item() for m in maps.values())
    cx = lambda k: left + (k + 1) * (cell + 4) + 16 * (k >= len(points))  # x of map column k
    canvas = Image.new("RGB", (cx(2 * len(points)) + 60, top + len(maps) * (cell + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((cx(0), 4), "raw tokens: cosine to the red point", fill="black")
    draw.text((cx(len(points)), 4), f"after spatial normalisation (gamma={gamma})", fill="black")
    for row, (name, m) in enumerate(maps.items()):
        y = top + row * (cell + 4)
        draw.text((4, y + cell // 2), name, fill="black")
        canvas.paste(Image.fromarray(image.permute(1, 2, 0).numpy()).resize((cell, cell), Image.BICUBIC), (left, y))
        for k, sim in enumerate(m):
            canvas.paste(Image.fromarray(colour(((sim - lo) / (hi - lo)).numpy())).resize((cell, cell), Image.NEAREST), (cx(k), y))
            r, c = points[k % len(points)]
            px, py = cx(k) + (c + 0.5) * cell / W, y + (r + 0.5) * cell / H
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill="red", outline="white")
    bar = colour(np.linspace(1, 0, canvas.height - top - 24)[:, None].repeat(12, 1))
    canvas.paste(Image.fromarray(bar), (cx(2 * len(points)), top + 12))
    draw.text((cx(2 * len(points)) + 14, top), f"{hi:.2f}", fill="black")
    draw.text((cx(2 * len(points)) + 14, canvas.height - 14), f"{lo:.2f}", fill="black")
    canvas.save(path)

def read_fid_table(path):
    rows = list(csv.DictReader(open(path)))
    if not rows or not {"encoder", "gfid"} <= set(rows[0]):
        raise ValueError(f"{path}: need a header with columns encoder,gfid[,linear_probe] and one row per encoder")
    return rows

def fid_correlations(rows, means):
    """Pearson r with gFID of each metric mean (and of linear_probe if the table has it), over the encoders present in
    both the table rows and means {encoder: {metric: value}}: {column: (r, values)}, and the gFID values."""
    rows = [r for r in rows if r["encoder"] in means]
    if len(rows) < 3:
        raise ValueError(f"need >= 3 encoders with both a gFID and metrics to correlate, got {len(rows)}")
    gfid = [float(r["gfid"]) for r in rows]
    cols = {m.upper(): [means[r["encoder"]][m] for r in rows] for m in METRICS if m in means[rows[0]["encoder"]]}
    if "linear_probe" in rows[0]:
        cols["linear probe"] = [float(r["linear_probe"]) for r in rows]
    return {c: (float(pearsonr(x, gfid)[0]), x) for c, x in cols.items()}, gfid

def draw_scatter(path, corr, gfid, size=240, pad=36):
    """One panel per column: gFID (y) against its values (x), the least-squares line, r in the title."""
    canvas = Image.new("RGB", (size * len(corr), size), "white")
    draw, y = ImageDraw.Draw(canvas), np.asarray(gfid, float)
    scale = lambda v, lo, hi, a, b: a + (v - lo) / max(hi - lo, 1e-12) * (b - a)
    for k, (name, (r, x)) in enumerate(corr.items()):
        x, x0 = np.asarray(x, float), k * size
        px, py = lambda v: scale(v, x.min(), x.max(), x0 + pad, x0 + size - 12), lambda v: scale(v, y.min(), y.max(), size - pad, 24)
        draw.rectangle([x0 + pad - 6, 18, x0 + size - 6, size - pad + 6], outline="black")
        a, b = np.polyfit(x, y, 1)
        draw.line([px(x.min()), py(a * x.min() + b), px(x.max()), py(a * x.max() + b)], fill=(231, 76, 60), width=2)
        for u, v in zip(px(x), py(y)):
            draw.ellipse([u - 4, v - 4, u + 4, v + 4], fill=(52, 152, 219), outline="black")
        draw.text((x0 + pad, 4), f"{name}: r = {r:+.3f}", fill="black")
        draw.text((x0 + pad, size - pad + 10), f"{name} {x.min():.3g} .. {x.max():.3g}", fill="black")
        draw.text((x0 + 2, 20), f"gFID\n{y.max():.3g}\n\n\n{y.min():.3g}", fill="black")
    canvas.save(path)

# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", nargs="+", help=f"encoders (default: the --fid-table rows): {' '.join(ENCODERS)}")
    p.add_argument("--encoder-weights", nargs="+", help="weights file or 'random': one for all encoders or one per encoder (default: pretrained)")
    p.add_argument("--images", help="image folder, first --num-images files by name, ADM centre crop to 256 px (default: train.py's generated images)")
    p.add_argument("--masks", help="foreground masks for SRSS, same file name stem as the images, non-zero = foreground (default: SRSS omitted)")
    p.add_argument("--num-images", type=int, default=1000, help="images to score")
    p.add_argument("--batch-size", type=int, default=100, help="images per encoder forward pass")
    p.add_argument("--grid", type=lambda s: tuple(int(v) for v in s.lower().split("x")), help="token grid HxW when not square")
    p.add_argument("--lds", choices=("code", "paper"), default="code", help="LDS definition: 'code' = official "
                   "metrics/spatial_metrics.py, 4-neighbours (d=1) vs d>=6; 'paper' = appendix B, d<H/2 vs d>=H/2 (d = Manhattan distance)")
    p.add_argument("--spnorm-gamma", type=float, help="also score the tokens after spatial normalisation with this gamma (0.6 SiT, 0.8 JiT)")
    p.add_argument("--csv", help="write the table to this CSV file")
    p.add_argument("--json", help="write the table to this JSON file")
    p.add_argument("--viz", help="PNG of cosine self-similarity maps of the first image, raw and spatially normalised (gamma: --spnorm-gamma, else 0.6)")
    p.add_argument("--fid-table", help="CSV with columns encoder,gfid[,linear_probe]: Pearson r of each metric with gFID, and a scatter PNG next to it")
    args = p.parse_args(argv)
    fid_rows = read_fid_table(args.fid_table) if args.fid_table else []
    names = args.encoder or [r["encoder"] for r in fid_rows]
    weights = args.encoder_weights or [None]
    if not names:
        p.error("give --encoder NAME [NAME ...] (or --fid-table)")
    if [n for n in names if n not in ENCODERS]:
        p.error(f"unknown encoder(s) {' '.join(n for n in names if n not in ENCODERS)}; known: {' '.join(ENCODERS)}")
    if len(weights) not in (1, len(names)):
        p.error(f"--encoder-weights: give one value or one per encoder ({len(names)}), got {len(weights)}")
    if args.masks and not args.images:
        p.error("--masks needs --images (masks are matched to image files)")
    try:
        images, masks = load_folder(args.images, args.masks, args.num_images) if args.images else (generated_images(args.num_images, 256)[0], None)
    except (ValueError, OSError) as e:
        p.error(str(e))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scores, first = {}, {}
    for name, w in zip(names, weights * len(names) if len(weights) == 1 else weights):
        s, first[name] = score_encoder(name, w, images, masks, args, device)
        scores.update(s)
    means = {row: {k: torch.nanmean(v).item() for k, v in s.items()} for row, s in scores.items()}
    cols = [m for m in METRICS if m in next(iter(means.values()))]
    width = max(map(len, means)) + 2
    print(f"\n{len(images)} images, LDS definition '{args.lds}', mean over images")
    print("encoder".ljust(width) + "".join(c.upper().rjust(10) for c in cols))
    for row, vals in means.items():
        print(row.ljust(width) + "".join(f"{vals[c]:10.4f}" for c in cols))
    if masks is None:
        print("SRSS omitted: it needs foreground masks (--images DIR --masks DIR)")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows([["encoder", *cols]] + [[row, *(vals[c] for c in cols)] for row, vals in means.items()])
    if args.json:
        Path(args.json).write_text(json.dumps({"num_images": len(images), "lds": args.lds, "means": means}, indent=2))
    if args.viz:
        draw_viz(args.viz, images[0], first, 0.6 if args.spnorm_gamma is None else args.spnorm_gamma, token_grid(len(first[names[0]]), args.grid))
    if args.fid_table:
        corr, gfid = fid_correlations(fid_rows, means)
        print(f"\nPearson r with gFID over {len(gfid)} encoders: " + "  ".join(f"{c} {r:+.3f}" for c, (r, _) in corr.items()))
        draw_scatter(Path(args.fid_table).with_suffix(".pearson.png"), corr, gfid)

if __name__ == "__main__":
    main()
