"""
The two diffusion transformers of iREPA: SiT (latent space, v-prediction) and JiT (pixel space,
x-prediction). Each keeps its official input convention and parameter names, so official
checkpoints load with strict=True (JiT: strip the "net." prefix of the official Denoiser).

    model = models["SiT-B/2"]()                    # ImageNet 256: 1000 classes + null class 1000
    out, h = model(x, t, y, align_depth=4)         # h: (B, T, D) hidden tokens after block 4

SiT: x (B, 4, R/8, R/8) SD-VAE latents, t in [0, 1] with t=0 data and t=1 noise, out = velocity.
JiT: x (B, 3, R, R) pixels in [-1, 1], t in [0, 1] with t=1 data and t=0 noise, out = clean image.
No projector lives here: align.py owns it, so the same networks train with or without REPA.

    python model.py     # prints the parameter count of every configuration
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:  # Triton ships with PyTorch's CUDA builds: JiT's q/k norm + RoPE kernels on a GPU (below)
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS wheels: the PyTorch path everywhere
    triton = None

# -----------------------------------------------------------------------------
# Pieces both families share (DiT lineage)


def modulate(x, shift, scale):
    # x (B, T, D), shift/scale (B, D): adaLN
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(dim, grid):
    """Fixed 2D sin-cos table (grid*grid, dim): first half encodes the column, second the row (MAE)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")

    def emb1d(pos):
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)
    return torch.cat([emb1d(cols), emb1d(rows)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """Scalar t -> 256-d sinusoid [cos | sin] (max period 1e4) -> Linear-SiLU-Linear."""

    def __init__(self, hidden_size, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))  # (B, D)


class LabelEmbedder(nn.Module):
    """num_classes + 1 rows: the last row is the null class used for classifier-free guidance.
    Label dropout happens in train.py, for both families alike."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y):
        return self.embedding_table(y)


def patch_matmul(x, conv):
    """conv(x) for a patch embedding (stride = kernel, no padding), as one matrix product over the unfolded
    patches: (B, C, H, W) -> (B, H/p, W/p, D), token-major in memory. Same values (the weights stay a Conv2d,
    under the official names). cuDNN ran these convs far below the GPU's matrix rate and added layout copies
    around them; as matrix products the training step is ~2% faster (README, Performance). Token-major
    output also keeps the residual stream contiguous: a channel-major view made every LayerNorm read with
    a 1 KB stride under torch.compile."""
    B, C, H, W = x.shape
    ph, pw = conv.kernel_size
    x = x.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5).flatten(3)  # (B, h, w, C*ph*pw)
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def unpatchify(x, p, c):
    # (B, T, p*p*c) -> (B, c, H, W), tokens in row-major order
    B, T, _ = x.shape
    g = math.isqrt(T)
    x = x.reshape(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, c, g * p, g * p)


def check_input(model, x):
    want = (model.in_channels, model.input_size, model.input_size)
    if tuple(x.shape[1:]) != want:
        raise ValueError(f"{type(model).__name__} built for inputs (B, {', '.join(map(str, want))}) "
                         f"but got {tuple(x.shape)}: pass image_size= when building the model")


def init_dit_weights(model):
    """The DiT initialisation both official codebases use; ends with adaLN-Zero (output 0 at init)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    for layer in (model.final_layer.adaLN_modulation[-1], model.final_layer.linear):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)

# -----------------------------------------------------------------------------
# SiT: Scalable interpolant Transformer on SD-VAE latents (same network as DiT)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x):
        return patch_matmul(x, self.proj).flatten(1, 2)  # (B, T, D)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim), flash kernel on GPU
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiTBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class SiTFinalLayer(nn.Module):
    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SiT(nn.Module):
    def __init__(self, image_size=256, patch_size=2, hidden_size=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, num_classes=1000, in_channels=4, vae_factor=8):
        super().__init__()
        self.in_channels, self.num_classes, self.patch_size = in_channels, num_classes, patch_size
        self.hidden_size = hidden_size
        self.input_size = image_size // vae_factor   # latent side: 32 at 256 px
        self.grid = self.input_size // patch_size    # token grid side: 16 for SiT-*/2 at 256 px
        self.recompute = 0                           # activation checkpointing of the first N blocks (train.py)
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        # frozen, but a Parameter (not a buffer) so the official checkpoints' "pos_embed" key lines up
        self.pos_embed = nn.Parameter(sincos_pos_embed(hidden_size, self.grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        # (the official SiT-S builds this with width 768 and crashes; ours uses hidden_size)
        self.final_layer = SiTFinalLayer(hidden_size, patch_size, in_channels)
        init_dit_weights(self)
        w = self.x_embedder.proj.weight  # patch embedding initialised like a Linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

    def forward(self, x, t, y, align_depth=None):
        check_input(self, x)
        x = self.x_embedder(x) + self.pos_embed      # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        h = None
        for i, block in enumerate(self.blocks):
            # the first `recompute` blocks keep no activations and recompute them in backward (saves memory)
            x = checkpoint(block, x, c, use_reentrant=False) if i < self.recompute and self.training else block(x, c)
            if i + 1 == align_depth:
                h = x                                # (B, T, D) what REPA aligns
        x = self.final_layer(x, c)                   # (B, T, p*p*C)
        return unpatchify(x, self.patch_size, self.in_channels), h

# -----------------------------------------------------------------------------
# JiT: "Just image Transformers", pixel-space x-prediction


class RMSNorm(nn.Module):
    """LLaMA RMSNorm, computed in fp32 whatever the input dtype (as the official)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)).to(x.dtype)


def rope_tables(head_dim, grid, prefix=0):
    """2D RoPE (cos, sin), each (prefix + grid*grid, 1, head_dim), broadcasting over heads: the first half of
    the head dims rotates with the row index, the second half with the column; frequencies repeat in pairs for
    the interleaved rotation, and `sin` carries the rotation's signs (-, +) in each pair. `prefix` rows of
    identity (cos 1, sin 0) leave class tokens unrotated."""
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    pos = torch.arange(grid) / grid * grid               # float32 grid positions, as the official
    f = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # (grid, dim)
    f = torch.cat([f[:, None, :].expand(grid, grid, dim), f[None, :, :].expand(grid, grid, dim)], dim=-1)
    f = f.reshape(grid * grid, head_dim)
    cos = torch.cat([torch.ones(prefix, head_dim), f.cos()])
    sin = torch.cat([torch.zeros(prefix, head_dim), f.sin() * torch.tensor([-1.0, 1.0]).repeat(dim)])
    return cos[:, None], sin[:, None]


def apply_rope(x, cos, sin):
    # x (B, T, heads, hd): each interleaved pair (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), as a swap of the
    # pair times the signed sin table. Compiled, the swap is one unmasked load per element; the official
    # stack([-x2, x1]) became masked gathers that ran at a third of the memory bandwidth.
    return x * cos + x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * sin


# JiT's q/k RMSNorm + RoPE on the GPU: one hand-written Triton kernel each way (Triton ships with PyTorch's CUDA
# builds). They compute apply_rope(RMSNorm(x)) above, which stays the definition: the CPU runs it, and the tests
# compare the kernels with it. Compiled, that PyTorch ran at ~0.9 TB/s (rows of only 64 values, the pair swap as a
# gather, fp32 intermediates in the backward). Here a program loads 32 whole rows, swaps pairs in registers, and the
# backward recomputes the norm from the input: JiT-B/16 trains 1.3-3.4% faster (README, Performance).
if triton is not None:
    @triton.jit
    def _qk_rows(X, W, COS, SIN, sb, st, sh, H, T, n_rows, eps, HD: tl.constexpr, P: tl.constexpr, ROWS: tl.constexpr):
        # this program's ROWS rows (token, head) of x (B, T, H, HD) at strides (sb, st, sh, 1), as (ROWS, P) tiles,
        # with the norm's weight and the RoPE tables: P is HD rounded up to a power of two (JiT-H's 80 -> 128), the
        # lanes past HD masked
        rows, cols = tl.program_id(0) * ROWS + tl.arange(0, ROWS), tl.arange(0, P)
        ok = (rows < n_rows)[:, None] & (cols < HD)
        b, t, h = rows // (T * H), rows // H % T, rows % H
        x = tl.load(X + (b.to(tl.int64) * sb + t * st + h * sh)[:, None] + cols, mask=ok, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, 1) / HD + eps)[:, None]  # 1 / rms
        w = tl.load(W + cols, mask=cols < HD, other=0.0)
        cos = tl.load(COS + t[:, None] * HD + cols, mask=ok, other=0.0)
        sin = tl.load(SIN + t[:, None] * HD + cols, mask=ok, other=0.0)
        out = rows.to(tl.int64)[:, None] * HD + cols  # offsets in a contiguous (B, T, H, HD) tensor
        return out, ok, x, r, w, cos, sin

    @triton.jit
    def _swap_pairs(x, ROWS: tl.constexpr, P: tl.constexpr):
        # (x1, x2, x3, x4, ...) -> (x2, x1, x4, x3, ...): apply_rope's flip
        a, b = tl.split(tl.reshape(x, (ROWS, P // 2, 2)))
        return tl.reshape(tl.join(b, a), (ROWS, P))

    @triton.jit
    def _qk_norm_rope_fwd(X, W, COS, SIN, Y, eps, sb, st, sh, H, T, n_rows,
                          HD: tl.constexpr, P: tl.constexpr, ROWS: tl.constexpr):
        out, ok, x, r, w, cos, sin = _qk_rows(X, W, COS, SIN, sb, st, sh, H, T, n_rows, eps, HD, P, ROWS)
        y = (x * r * w).to(X.dtype.element_ty).to(tl.float32)  # RMSNorm, rounded to x's dtype as the official
        y = y * cos + _swap_pairs(y, ROWS, P) * sin
        tl.store(Y + out, y.to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _qk_norm_rope_bwd(X, W, COS, SIN, G, DX, DW, eps, sb, st, sh, H, T, n_rows,
                          HD: tl.constexpr, P: tl.constexpr, ROWS: tl.constexpr):
        out, ok, x, r, w, cos, sin = _qk_rows(X, W, COS, SIN, sb, st, sh, H, T, n_rows, eps, HD, P, ROWS)
        g = tl.load(G + out, mask=ok, other=0.0).to(tl.float32)
        dy = (g * cos + _swap_pairs(g * sin, ROWS, P)).to(X.dtype.element_ty).to(tl.float32)  # RoPE, transposed
        n, dn = x * r, dy * w
        dx = r * (dn - n * (tl.sum(dn * n, 1) / HD)[:, None])  # RMSNorm's backward
        tl.store(DX + out, dx.to(DX.dtype.element_ty), mask=ok)
        # this program's share of the weight's gradient, summed over the programs after the kernel
        tl.store(DW + tl.program_id(0) * HD + tl.arange(0, P), tl.sum(dy * n, 0), mask=tl.arange(0, P) < HD)

    _ROWS = 32  # rows per program: 4 KB of bf16 in and out at head dim 64

    def _qk_launch(kernel, x, *args):  # args: the kernel's tensors after X, then eps
        B, T, H, hd = x.shape
        assert x.stride(-1) == 1, "the head dim must be contiguous"
        grid = (triton.cdiv(B * T * H, _ROWS),)
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # Triton uses the current GPU
            kernel[grid](x, *args, *x.stride()[:3], H, T, B * T * H, HD=hd, P=triton.next_power_of_2(hd), ROWS=_ROWS)

    @torch.library.custom_op("irepa::qk_norm_rope", mutates_args=())
    def qk_norm_rope(x: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     eps: float) -> torch.Tensor:
        """apply_rope(RMSNorm(x)) for x (B, T, heads, hd) -> (B, T, heads, hd) in x's dtype; cos, sin (T, 1, hd)."""
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _qk_launch(_qk_norm_rope_fwd, x, w, cos.contiguous(), sin.contiguous(), y, eps)
        return y

    @torch.library.custom_op("irepa::qk_norm_rope_backward", mutates_args=())
    def _qk_norm_rope_backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, cos: torch.Tensor,
                               sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dw = torch.empty(triton.cdiv(x.shape[:3].numel(), _ROWS), x.shape[-1], dtype=torch.float32, device=x.device)
        _qk_launch(_qk_norm_rope_bwd, x, w, cos.contiguous(), sin.contiguous(), g.contiguous(), dx, dw, eps)
        return dx, dw.sum(0).to(w.dtype)

    @qk_norm_rope.register_fake
    def _(x, w, cos, sin, eps):  # output shapes, for torch.compile
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    @_qk_norm_rope_backward.register_fake
    def _(g, x, w, cos, sin, eps):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty_like(w)

    def _qk_save(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4])  # x is a view of the qkv output, which attention keeps anyway (for v)
        ctx.eps = inputs[4]

    def _qk_grad(ctx, g):
        return *_qk_norm_rope_backward(g, *ctx.saved_tensors, ctx.eps), None, None, None

    qk_norm_rope.register_autograd(_qk_grad, setup_context=_qk_save)


class JiTAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q_norm = RMSNorm(dim // num_heads)
        self.k_norm = RMSNorm(dim // num_heads)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin):
        B, T, D = x.shape
        # q, k, v stay token-major (B, T, heads, hd) and enter attention as transposed views (the official
        # permutes them head-major): the q/k norm and RoPE compile into one kernel, and the attention output comes
        # back token-major, so `proj` needs no transpose copy. Same values; README, Performance.
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).unbind(2)
        if q.is_cuda and triton is not None:  # the same function, one kernel each way (above)
            q = qk_norm_rope(q, self.q_norm.weight, cos, sin, self.q_norm.eps)
            k = qk_norm_rope(k, self.k_norm.weight, cos, sin, self.k_norm.eps)
        else:
            q = apply_rope(self.q_norm(q), cos, sin)
            k = apply_rope(self.k_norm(k), cos, sin)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        hidden = int(hidden * 2 / 3)  # keeps the parameter count of a 4x GELU MLP
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class JiTBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = JiTAttention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, cos, sin):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class BottleneckPatchEmbed(nn.Module):
    """p x p patch -> low-rank bottleneck (no bias) -> hidden: keeps the embedding small at p=16/32."""

    def __init__(self, patch_size, in_channels, bottleneck, hidden_size):
        super().__init__()
        self.proj1 = nn.Conv2d(in_channels, bottleneck, patch_size, stride=patch_size, bias=False)
        self.proj2 = nn.Conv2d(bottleneck, hidden_size, 1)

    def forward(self, x):
        h = patch_matmul(x, self.proj1)                                                   # (B, g, g, bottleneck)
        return F.linear(h, self.proj2.weight.flatten(1), self.proj2.bias).flatten(1, 2)   # 1x1 conv: (B, T, D)


class JiTFinalLayer(nn.Module):
    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class JiT(nn.Module):
    def __init__(self, image_size=256, patch_size=16, hidden_size=768, depth=12, num_heads=12,
                 bottleneck=128, in_context_len=32, in_context_start=4, mlp_ratio=4.0,
                 num_classes=1000, in_channels=3):
        super().__init__()
        self.in_channels, self.num_classes, self.patch_size = in_channels, num_classes, patch_size
        self.hidden_size = hidden_size
        self.input_size = image_size
        self.grid = image_size // patch_size
        self.recompute = 0
        self.in_context_len, self.in_context_start = in_context_len, in_context_start
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.x_embedder = BottleneckPatchEmbed(patch_size, in_channels, bottleneck, hidden_size)
        self.pos_embed = nn.Parameter(sincos_pos_embed(hidden_size, self.grid)[None], requires_grad=False)
        # the class tokens: label embedding + a learned position each, prepended before block in_context_start
        self.in_context_posemb = nn.Parameter(torch.randn(1, in_context_len, hidden_size) * 0.02)
        for name, prefix in (("rope", 0), ("rope_ctx", in_context_len)):
            cos, sin = rope_tables(hidden_size // num_heads, self.grid, prefix)
            self.register_buffer(name + "_cos", cos, persistent=False)  # not in the official state dict
            self.register_buffer(name + "_sin", sin, persistent=False)
        self.blocks = nn.ModuleList([JiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = JiTFinalLayer(hidden_size, patch_size, in_channels)
        init_dit_weights(self)
        for w in (self.x_embedder.proj1.weight, self.x_embedder.proj2.weight):
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj2.bias)

    def forward(self, x, t, y, align_depth=None):
        check_input(self, x)
        y_emb = self.y_embedder(y)
        c = self.t_embedder(t) + y_emb                # (B, D)
        x = self.x_embedder(x) + self.pos_embed       # (B, T, D)
        n_ctx, h = 0, None
        for i, block in enumerate(self.blocks):
            if i == self.in_context_start and self.in_context_len > 0:
                ctx = y_emb.unsqueeze(1) + self.in_context_posemb  # (B, in_context_len, D)
                x, n_ctx = torch.cat([ctx, x], dim=1), self.in_context_len
            rope = (self.rope_ctx_cos, self.rope_ctx_sin) if n_ctx else (self.rope_cos, self.rope_sin)
            x = checkpoint(block, x, c, *rope, use_reentrant=False) if i < self.recompute and self.training \
                else block(x, c, *rope)
            if i + 1 == align_depth:
                h = x[:, n_ctx:]                      # (B, T, D) patch tokens only
        x = self.final_layer(x[:, n_ctx:], c)         # class tokens never reach the output
        return unpatchify(x, self.patch_size, self.in_channels), h

# -----------------------------------------------------------------------------
# Official names -> constructors. models[name]() is the ImageNet-256 configuration; pass
# image_size=512 (or a small size for tests), num_classes=... to change it.


SIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
JIT_SIZES = {"B": (12, 768, 12, 128, 4), "L": (24, 1024, 16, 128, 8), "H": (32, 1280, 16, 256, 10)}


def _sit(size, p):
    depth, hidden, heads = SIT_SIZES[size]
    return lambda image_size=256, num_classes=1000: SiT(image_size, p, hidden, depth, heads, num_classes=num_classes)


def _jit(size, p):
    depth, hidden, heads, bottleneck, start = JIT_SIZES[size]
    return lambda image_size=256, num_classes=1000: JiT(image_size, p, hidden, depth, heads, bottleneck,
                                                        in_context_start=start, num_classes=num_classes)


models = {f"SiT-{s}/{p}": _sit(s, p) for s in SIT_SIZES for p in (2, 4, 8)}
models.update({f"JiT-{s}/{p}": _jit(s, p) for s in JIT_SIZES for p in (16, 32)})
# Small JiT for the offline CPU demo and tests (not in the paper): 6 layers of width 128, 4 class tokens.
models["JiT-demo/16"] = lambda image_size=64, num_classes=10: JiT(
    image_size, 16, 128, 6, 4, bottleneck=32, in_context_len=4, in_context_start=2, num_classes=num_classes)


def noise_std(family, image_size):
    """JiT's noise std: 1 at 256 px, 2 from 512 px (the JiT paper's recipe); SiT latents always use 1."""
    return 2.0 if family.lower() == "jit" and image_size >= 512 else 1.0


def build_model(name, image_size=256, num_classes=1000):
    if name not in models:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(models)}")
    return models[name](image_size=image_size, num_classes=num_classes)


if __name__ == "__main__":
    for name in models:
        with torch.device("meta"):
            m = models[name]()  # each at its own default size (JiT-demo/16: 64 px, 10 classes)
        n = sum(p.numel() for p in m.parameters() if p.requires_grad)
        print(f"{name:12s} trainable {n:>13,d}   grid {m.grid}x{m.grid}")
