"""
The two diffusion transformers of iREPA: SiT (latent space, v-prediction) and JiT (pixel space,
x-prediction). Each keeps its official input convention and parameter names, so official
checkpoints load with strict=True (JiT: strip the "net." prefix of the official Denoiser).

    model = build_model("SiT-B/2")                 # ImageNet 256: 1000 classes + null class 1000
    out, hidden = model(x, t, y, align_depth=4)    # hidden: (B, T, D) tokens after block 4

SiT: x (B, 4, R/8, R/8) SD-VAE latents, t in [0, 1] with t=0 data and t=1 noise, out = velocity.
JiT: x (B, 3, R, R) pixels in [-1, 1], t in [0, 1] with t=1 data and t=0 noise, out = clean image.
No projector lives here: align.py owns it, so the same networks train with or without REPA.

    python model.py     # prints the parameter count of every configuration
"""
import math
from collections import OrderedDict
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F


# Layers: SiT's are DiT's; JiT's add a bottleneck patch embedding, SwiGLU, RMSNorm, q/k-norm, RoPE
def modulate(x, shift, scale):  # x (B, T, D), shift/scale (B, D): adaLN
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(dim, grid):
    """Fixed 2D sin-cos table (grid*grid, dim): first half encodes the column, second the row."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    out = torch.stack([cols.flatten(), rows.flatten()], 1)[..., None] * omega  # (T, 2, dim/4)
    return torch.cat([out.sin(), out.cos()], dim=2).flatten(1).float()


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        i = torch.arange(128, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(10000) * i / 128)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))  # (B, D)


def named(**layers):  # a Sequential whose names are the official checkpoints' keys
    return nn.Sequential(OrderedDict(layers))


def unpatchify(x, p, c):  # (B, T, p*p*c) -> (B, c, H, W), tokens in row-major order
    B, g = x.shape[0], math.isqrt(x.shape[1])  # g: token grid side
    x = x.reshape(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, c, g * p, g * p)


class FinalLayer(nn.Module):
    def __init__(self, dim, patch_size, out_channels, norm):  # norm: SiT LayerNorm, JiT RMSNorm
        super().__init__()
        self.norm_final = norm
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed(nn.Sequential):
    """(B, C, H, W) -> (B, T, D) row-major tokens by convs of stride = kernel: SiT's one, JiT's a
    low-rank bottleneck (no bias) then a 1x1 (a small embedding at p=16/32)."""
    def forward(self, x):
        return super().forward(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        hidden = int(hidden * 2 / 3)  # keeps the parameter count of a 4x GELU MLP
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class RMSNorm(nn.Module):
    """LLaMA RMSNorm, computed in fp32 whatever the input dtype (as the official)."""
    def __init__(self, dim):
        super().__init__()
        self.eps = 1e-6
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)).to(x.dtype)


def rope_tables(head_dim, grid, prefix=0):
    """2D RoPE (cos, sin), each (prefix + grid*grid, 1, head_dim): first half of head dims by row,
    second by column, in pairs whose signs `sin` holds; `prefix` identity rows skip class tokens."""
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    pos = torch.arange(grid) / grid * grid               # float32 grid positions, as the official
    f = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # (grid, dim)
    f = torch.cat([f[:, None].expand(grid, grid, dim), f[None].expand(grid, grid, dim)], dim=-1)
    f = f.reshape(grid * grid, head_dim)  # (row, column) frequencies of each token
    signs = torch.tensor([-1.0, 1.0]).repeat(dim)
    cos = torch.cat([torch.ones(prefix, head_dim), f.cos()])
    sin = torch.cat([torch.zeros(prefix, head_dim), f.sin() * signs])
    return cos[:, None], sin[:, None]


def apply_rope(x, cos, sin):
    # x (B, T, heads, hd): pair (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), by a swap
    return x * cos + x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * sin


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        self.num_heads = num_heads
        if qk_norm:
            self.q_norm = RMSNorm(dim // num_heads)
            self.k_norm = RMSNorm(dim // num_heads)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, *rope):  # rope: JiT's (cos, sin) tables, with q/k-norm
        B, T, D = x.shape
        # q, k, v (B, T, heads, hd) enter attention as head-major views: the output is token-major
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).unbind(2)
        if rope:
            q, k = self.qk_norm_rope(q, k, *rope)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(x.transpose(1, 2).reshape(B, T, D))

    def qk_norm_rope(self, q, k, cos, sin):
        # q, k (B, T, heads, hd): RMSNorm per head, then RoPE (kernels.py fuses both on GPU)
        return apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)


class Block(nn.Module):
    """c (B, D) shifts, scales and gates both residual branches (adaLN-Zero: gates start at 0)."""
    def __init__(self, dim, num_heads, mlp_ratio, jit):
        super().__init__()
        Norm = RMSNorm if jit else partial(nn.LayerNorm, elementwise_affine=False, eps=1e-6)
        self.norm1 = Norm(dim)
        self.attn = Attention(dim, num_heads, qk_norm=jit)
        self.norm2 = Norm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = SwiGLU(dim, hidden) if jit else Mlp(dim, hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, *rope):  # rope: JiT's (cos, sin) tables
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), *rope)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


def check_input(model, x):
    C, S = model.in_channels, model.input_size
    if tuple(x.shape[1:]) != (C, S, S):
        raise ValueError(f"{type(model).__name__} built for inputs (B, {C}, {S}, {S}) but got "
                         f"{tuple(x.shape)}: pass image_size= when building the model")


def init_dit_weights(model):
    """DiT's initialisation, as in both official codebases: adaLN-Zero makes the output 0."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    for emb in filter(None, [model.t_embedder, getattr(model, "h_embedder", None)]):
        nn.init.normal_(emb.mlp[0].weight, std=0.02)
        nn.init.normal_(emb.mlp[2].weight, std=0.02)
    zeroed = [b.adaLN_modulation[-1] for b in [*model.blocks, model.final_layer]]
    for layer in zeroed + [model.final_layer.linear]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    for conv in model.x_embedder:  # patch convs initialised as Linears
        nn.init.xavier_uniform_(conv.weight.flatten(1))
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)


class SiT(nn.Module):
    def __init__(self, image_size=256, patch_size=2, hidden_size=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, num_classes=1000, in_channels=4, vae_factor=8, mean_flow=False):
        super().__init__()
        self.in_channels, self.num_classes, self.patch_size = in_channels, num_classes, patch_size
        self.hidden_size = hidden_size
        self.input_size = image_size // vae_factor   # latent side: 32 at 256 px
        self.grid = self.input_size // patch_size    # token grid side
        self.x_embedder = PatchEmbed(OrderedDict(
            proj=nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)))
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.h_embedder = TimestepEmbedder(hidden_size) if mean_flow else None  # MeanFlow's t - r
        self.y_embedder = named(embedding_table=nn.Embedding(num_classes + 1, hidden_size))
        # frozen, but a Parameter (not a buffer): the official checkpoints' "pos_embed" key
        pos = sincos_pos_embed(hidden_size, self.grid)[None]  # (1, T, D)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        blocks = [Block(hidden_size, num_heads, mlp_ratio, jit=False) for _ in range(depth)]
        self.blocks = nn.ModuleList(blocks)
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels,
                                      nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6))
        init_dit_weights(self)

    def forward(self, x, t, y, align_depth=None, h=None):
        check_input(self, x)
        x = self.x_embedder(x) + self.pos_embed      # (B, T, D)
        c = self.t_embedder(t)                       # (B, D)
        if self.h_embedder is not None:              # MeanFlow: h = 0 is the velocity at t
            c = c + self.h_embedder(torch.zeros_like(t) if h is None else h)
        c = c + self.y_embedder(y)
        hidden = None
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if i + 1 == align_depth:
                hidden = x                           # (B, T, D) what REPA aligns
        x = self.final_layer(x, c)                   # (B, T, p*p*C)
        return unpatchify(x, self.patch_size, self.in_channels), hidden


class JiT(nn.Module):
    def __init__(self, image_size=256, patch_size=16, hidden_size=768, depth=12, num_heads=12,
                 bottleneck=128, in_context_len=32, in_context_start=4, mlp_ratio=4.0,
                 num_classes=1000, in_channels=3):
        super().__init__()
        self.in_channels, self.num_classes, self.patch_size = in_channels, num_classes, patch_size
        self.hidden_size = hidden_size
        self.input_size = image_size                # pixels per side
        self.grid = image_size // patch_size        # tokens per side
        self.in_context_len, self.in_context_start = in_context_len, in_context_start
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = named(embedding_table=nn.Embedding(num_classes + 1, hidden_size))
        self.x_embedder = PatchEmbed(OrderedDict(
            proj1=nn.Conv2d(in_channels, bottleneck, patch_size, stride=patch_size, bias=False),
            proj2=nn.Conv2d(bottleneck, hidden_size, 1)))
        pos = sincos_pos_embed(hidden_size, self.grid)[None]  # (1, T, D)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        # the class tokens: label embedding + a learned position each, prepended at in_context_start
        self.in_context_posemb = nn.Parameter(torch.randn(1, in_context_len, hidden_size) * 0.02)
        cos, sin = rope_tables(hidden_size // num_heads, self.grid, prefix=in_context_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        blocks = [Block(hidden_size, num_heads, mlp_ratio, jit=True) for _ in range(depth)]
        self.blocks = nn.ModuleList(blocks)
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, RMSNorm(hidden_size))
        init_dit_weights(self)

    def forward(self, x, t, y, align_depth=None):
        check_input(self, x)
        y_emb = self.y_embedder(y)
        c = self.t_embedder(t) + y_emb                # (B, D)
        x = self.x_embedder(x) + self.pos_embed       # (B, T, D)
        n_ctx, hidden = 0, None
        for i, block in enumerate(self.blocks):
            if i == self.in_context_start:
                ctx = y_emb.unsqueeze(1) + self.in_context_posemb  # (B, in_context_len, D)
                x, n_ctx = torch.cat([ctx, x], dim=1), self.in_context_len
            rope = (self.rope_cos[-x.shape[1]:], self.rope_sin[-x.shape[1]:])  # (T, 1, hd) each
            x = block(x, c, *rope)
            if i + 1 == align_depth:
                hidden = x[:, n_ctx:]                 # (B, T, D) patch tokens only
        x = self.final_layer(x[:, n_ctx:], c)         # class tokens never reach the output
        return unpatchify(x, self.patch_size, self.in_channels), hidden


# Official names -> constructors: models[name]() is the ImageNet-256 configuration
SIT_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
JIT_SIZES = {
    "B": dict(depth=12, hidden_size=768, num_heads=12, bottleneck=128, in_context_start=4),
    "L": dict(depth=24, hidden_size=1024, num_heads=16, bottleneck=128, in_context_start=8),
    "H": dict(depth=32, hidden_size=1280, num_heads=16, bottleneck=256, in_context_start=10),
}
models = {f"SiT-{size}/{p}": partial(SiT, patch_size=p, **cfg)
          for size, cfg in SIT_SIZES.items() for p in (2, 4, 8)}
models.update({f"JiT-{size}/{p}": partial(JiT, patch_size=p, **cfg)
               for size, cfg in JIT_SIZES.items() for p in (16, 32)})
# Small models for the offline CPU demos and tests (not in the paper)
models["JiT-demo/16"] = partial(
    JiT, image_size=64, patch_size=16, num_classes=10, depth=6, hidden_size=128, num_heads=4,
    bottleneck=32, in_context_len=4, in_context_start=2)
models["SiT-demo/4"] = partial(
    SiT, image_size=32, patch_size=4, num_classes=10, depth=4, hidden_size=128, num_heads=4,
    in_channels=3, vae_factor=1)


def in_latent_space(name):
    return name.startswith("SiT") and name != "SiT-demo/4"


def noise_std(family, image_size):
    """JiT's noise std (family "JiT" or "jit"): 1 at 256 px, 2 from 512 px; SiT always 1."""
    return 2.0 if family.lower() == "jit" and image_size >= 512 else 1.0


def build_model(name, image_size=256, num_classes=1000, mean_flow=False):
    if name not in models:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(models)}")
    kw = dict(mean_flow=True) if mean_flow else {}  # SiT only (runs.check_run refuses JiT)
    return models[name](image_size=image_size, num_classes=num_classes, **kw)


if __name__ == "__main__":
    for name in models:
        with torch.device("meta"):
            m = models[name]()  # each at its default size
        n = sum(p.numel() for p in m.parameters() if p.requires_grad)
        print(f"{name:12s} trainable {n:>13,d}   grid {m.grid}x{m.grid}")
