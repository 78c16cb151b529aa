"""GPU fast paths, each a subclass of a plain module (torch, timm, model.py) computing its function
faster, up to the README's two deviations (q and k rounded once to bf16; the encoders' GELU, tanh
in the matmul epilogue); the tests compare each with its plain twin. kernels.enable(module) swaps
them in, in place (train.py, sample.py, bench.py: on a GPU). An iREPA reader can skip it."""
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

import model

try:  # Triton ships with PyTorch's CUDA builds
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS wheels: JiT keeps its PyTorch q/k path
    triton = None


class PatchConv(nn.Conv2d):
    """A patch embedding (stride = kernel) as one matrix product, output token-major: cuDNN ran
    these convs far below the matrix rate, and its (B, T, D) tokens were a strided view."""
    def forward(self, x):
        B, C, H, W = x.shape
        ph, pw = self.kernel_size
        h, w = H // ph, W // pw  # a stride-p conv drops the last H % p rows and W % p columns
        x = x[:, :, :h * ph, :w * pw].reshape(B, C, h, ph, w, pw)
        x = x.permute(0, 2, 4, 1, 3, 5).flatten(3)  # (B, h, w, C*ph*pw)
        return F.linear(x, self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)


class LinearGELU(nn.Linear):
    """gelu(fc1(x)) of a timm Mlp (the frozen encoders) whose act enable() made Identity. In
    bf16/fp16 on a GPU: one cuBLASLt matrix product, bias and GELU in its fp32 epilogue."""
    approximate = "none"  # the replaced nn.GELU's, set by enable()

    def forward(self, x):
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        if not x.is_cuda or dtype not in (torch.bfloat16, torch.float16) or self.bias is None:
            return F.gelu(super().forward(x), approximate=self.approximate)
        w, b = self.weight.to(dtype), self.bias.to(dtype)
        h = torch._addmm_activation(b, x.flatten(0, -2).to(dtype), w.t(), use_gelu=True)
        return h.unflatten(0, x.shape[:-1])


# JiT's q/k RMSNorm + RoPE, model.py's apply_rope(RMSNorm(x)): a program loads whole rows,
# swaps pairs in registers (PyTorch gathers); the backward recomputes the norm.
if triton is not None:
    @triton.jit
    def _qk_rows(X, W, COS, SIN, sb, st, sh, H, T, N, eps,
                 HD: tl.constexpr, P: tl.constexpr, ROWS: tl.constexpr):
        # ROWS of the N rows (token, head) of x (B, T, H, HD), strides (sb, st, sh, 1), as
        # (ROWS, P) tiles; P is HD rounded up to a power of two (JiT-H 80 -> 128), the rest masked
        rows, cols = tl.program_id(0) * ROWS + tl.arange(0, ROWS), tl.arange(0, P)
        ok = (rows < N)[:, None] & (cols < HD)
        b, t, h = rows // (T * H), rows // H % T, rows % H
        at = (b.to(tl.int64) * sb + t * st + h * sh)[:, None] + cols
        x = tl.load(X + at, mask=ok, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, 1) / HD + eps)[:, None]  # 1 / rms
        w = tl.load(W + cols, mask=cols < HD, other=0.0)
        cos = tl.load(COS + t[:, None] * HD + cols, mask=ok, other=0.0)
        sin = tl.load(SIN + t[:, None] * HD + cols, mask=ok, other=0.0)
        out = rows.to(tl.int64)[:, None] * HD + cols  # offsets in a contiguous (B, T, H, HD)
        return out, ok, x, r, w, cos, sin

    @triton.jit
    def _swap_pairs(x, ROWS: tl.constexpr, P: tl.constexpr):  # (x1, x2, ...) -> (x2, x1, ...)
        a, b = tl.split(tl.reshape(x, (ROWS, P // 2, 2)))
        return tl.reshape(tl.join(b, a), (ROWS, P))

    @triton.jit
    def _qk_norm_rope_fwd(X, W, COS, SIN, Y, eps, sb, st, sh, H, T, N,
                          HD: tl.constexpr, P: tl.constexpr, ROWS: tl.constexpr):
        out, ok, x, r, w, cos, sin = _qk_rows(X, W, COS, SIN, sb, st, sh, H, T, N, eps, HD, P, ROWS)
        y = (x * r * w).to(X.dtype.element_ty).to(tl.float32)  # RMSNorm, in x's dtype
        y = y * cos + _swap_pairs(y, ROWS, P) * sin
        tl.store(Y + out, y.to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _qk_norm_rope_bwd(X, W, COS, SIN, G, DX, DW, eps, sb, st, sh, H, T, N,
                          HD: tl.constexpr, P: tl.constexpr, ROWS: tl.constexpr):
        out, ok, x, r, w, cos, sin = _qk_rows(X, W, COS, SIN, sb, st, sh, H, T, N, eps, HD, P, ROWS)
        g = tl.load(G + out, mask=ok, other=0.0).to(tl.float32)
        dy = (g * cos + _swap_pairs(g * sin, ROWS, P)).to(X.dtype.element_ty).to(tl.float32)
        n, dn = x * r, dy * w
        dx = r * (dn - n * (tl.sum(dn * n, 1) / HD)[:, None])  # RMSNorm's backward
        tl.store(DX + out, dx.to(DX.dtype.element_ty), mask=ok)
        # this program's share of dw, summed over the programs afterwards
        cols = tl.arange(0, P)
        tl.store(DW + tl.program_id(0) * HD + cols, tl.sum(dy * n, 0), mask=cols < HD)

    _ROWS = 32  # rows per program: 4 KB of bf16 in and out at head dim 64

    def _qk_launch(kernel, x, w, cos, sin, *rest):  # rest: tensors after SIN, then eps
        B, T, H, hd = x.shape
        grid = (triton.cdiv(B * T * H, _ROWS),)
        with torch.cuda.device(x.device) if x.is_cuda else nullcontext():  # Triton: current GPU
            kernel[grid](x, w, cos.contiguous(), sin.contiguous(), *rest, *x.stride()[:3], H, T,
                         B * T * H, HD=hd, P=triton.next_power_of_2(hd), ROWS=_ROWS)

    @torch.library.custom_op("irepa::qk_norm_rope", mutates_args=())
    def qk_norm_rope(x: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     eps: float) -> torch.Tensor:
        """apply_rope(RMSNorm(x)) of x (B, T, heads, hd) in x's dtype; cos, sin (T, 1, hd)."""
        y = x.new_empty(x.shape)  # contiguous
        _qk_launch(_qk_norm_rope_fwd, x, w, cos, sin, y, eps)
        return y

    @torch.library.custom_op("irepa::qk_norm_rope_backward", mutates_args=())
    def _qk_norm_rope_backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                               cos: torch.Tensor, sin: torch.Tensor,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        dx = x.new_empty(x.shape)
        programs = triton.cdiv(x.shape[:3].numel(), _ROWS)
        dw = torch.empty(programs, x.shape[-1], dtype=torch.float32, device=x.device)
        _qk_launch(_qk_norm_rope_bwd, x, w, cos, sin, g.contiguous(), dx, dw, eps)
        return dx, dw.sum(0).to(w.dtype)

    qk_norm_rope.register_fake(lambda x, w, cos, sin, eps: x.new_empty(x.shape))
    _qk_norm_rope_backward.register_fake(
        lambda g, x, w, cos, sin, eps: (x.new_empty(x.shape), torch.empty_like(w)))

    def _qk_save(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4])  # x: a view of qkv's output, kept anyway (for v)
        ctx.eps = inputs[4]

    def _qk_grad(ctx, g):
        return *_qk_norm_rope_backward(g, *ctx.saved_tensors, ctx.eps), None, None, None

    qk_norm_rope.register_autograd(_qk_grad, setup_context=_qk_save)


class JiTAttentionQK(model.Attention):
    def qk_norm_rope(self, q, k, cos, sin):
        if not q.is_cuda:
            return super().qk_norm_rope(q, k, cos, sin)
        return (qk_norm_rope(q, self.q_norm.weight, cos, sin, self.q_norm.eps),
                qk_norm_rope(k, self.k_norm.weight, cos, sin, self.k_norm.eps))


def enable(module):
    """Swap the fast paths into `module` in place; parameters and their names stay."""
    for m in module.modules():
        if (type(m) is nn.Conv2d and m.stride == m.kernel_size and m.padding == (0, 0)
                and m.dilation == (1, 1) and m.groups == 1):  # a patch embedding
            m.__class__ = PatchConv
        elif type(m) is Mlp and isinstance(m.act, nn.GELU) and type(m.fc1) is nn.Linear:
            m.fc1.__class__ = LinearGELU
            m.fc1.approximate = m.act.approximate
            m.act = nn.Identity()
        elif type(m) is model.Attention and hasattr(m, "q_norm") and triton is not None:
            m.__class__ = JiTAttentionQK
    return module


class GraphedStep:
    """A training step replayed from one CUDA graph: at a small batch per GPU the GPU outruns
    Python's kernel launches. The first 3 calls run the step as it is, on a side stream
    (compilation, the optimizer's lazy state); the 4th records it (recording runs nothing) and
    replays it, as does every later call. The inputs go through fixed buffers, and so does the
    learning rate: the recorded AdamW reads it from one. The random draws follow the seed set
    before each call, as in the plain step. The output is overwritten by the next call."""

    def __init__(self, step, opt):
        self.step, self.opt, self.calls = step, opt, 0
        self.graph = self.inputs = self.out = None
        self.lr = torch.zeros((), device="cuda")  # the one param group's lr

    def __call__(self, *inputs):  # CPU or GPU tensors, or None
        if self.inputs is None:
            self.inputs = [t if t is None else torch.empty_like(t, device="cuda") for t in inputs]
        for buffer, t in zip(self.inputs, inputs):
            if t is not None:
                buffer.copy_(t, non_blocking=True)
        self.calls += 1
        if self.calls <= 3:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        group = self.opt.param_groups[0]
        self.lr.fill_(group["lr"])
        if self.graph is None:  # capture checks capturable; fused AdamW's state is on the GPU
            lr, self.graph = group["lr"], torch.cuda.CUDAGraph()
            group.update(capturable=True, lr=self.lr)
            with torch.cuda.graph(self.graph):
                self.out = self.step(*self.inputs)
            group.update(capturable=False, lr=lr)
        self.graph.replay()
        return self.out
