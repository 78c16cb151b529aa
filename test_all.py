"""
The whole test suite, grouped by file. CPU, fixed seeds, small shapes; GPU-only tests skip cleanly.

    python -m pytest -q test_all.py
"""
import glob
import json
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(2)

import align  # noqa: E402
import model  # noqa: E402


@pytest.fixture
def cpu_only(monkeypatch):
    # in-process CLI runs pick CUDA when there is one;
    # tests whose reference is a CPU computation keep them on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

# =============================================================================
# model.py


def _tiny_sit(image_size=32, **kw):
    return model.SiT(image_size=image_size, patch_size=2, hidden_size=64, depth=4, num_heads=4,
                     num_classes=10, **kw)


def _tiny_jit(image_size=32, in_context_start=2, **kw):
    return model.JiT(image_size=image_size, patch_size=4, hidden_size=64, depth=4, num_heads=4,
                     bottleneck=16, in_context_len=4, in_context_start=in_context_start,
                     num_classes=10, **kw)


def _randomize(m, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return m


@pytest.mark.parametrize("name,count", [
    ("SiT-B/2", 130_303_504), ("SiT-L/2", 457_824_272), ("SiT-XL/2", 674_816_272),
    ("JiT-B/16", 131_123_712), ("JiT-L/16", 458_877_664), ("JiT-H/16", 952_514_368),
    ("JiT-B/32", 133_190_400)])
def test_model_parameter_counts(name, count):
    with torch.device("meta"):
        m = model.build_model(name)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == count


def test_model_sit_total_count_includes_frozen_tables():
    with torch.device("meta"):
        m = model.build_model("SiT-B/2")
    assert sum(p.numel() for p in m.parameters()) == 130_500_112  # + pos_embed + null-class row


def test_model_jit_frozen_pos_embed():
    with torch.device("meta"):
        m = model.build_model("JiT-B/16")
    assert m.pos_embed.numel() == 196_608 and not m.pos_embed.requires_grad


@pytest.mark.parametrize("build", [_tiny_sit, _tiny_jit])
def test_model_zero_output_at_init(build):
    torch.manual_seed(0)
    m = build()
    x = torch.randn(2, m.in_channels, m.input_size, m.input_size)
    out, h = m(x, torch.rand(2), torch.tensor([1, 10]), align_depth=2)
    assert out.abs().max() == 0 and h.abs().max() > 0


@pytest.mark.parametrize("name,res", [("SiT-B/2", 256), ("SiT-B/2", 512), ("SiT-XL/2", 256),
                                      ("JiT-B/16", 256), ("JiT-B/16", 512), ("JiT-B/32", 512),
                                      ("JiT-H/16", 256)])
def test_model_shapes_at_256_and_512(name, res):
    # Full-size configurations on the meta device: shapes without the compute.
    with torch.device("meta"):
        m = model.build_model(name, image_size=res)
        x = torch.empty(2, m.in_channels, m.input_size, m.input_size)
        out, h = m(x, torch.rand(2), torch.zeros(2, dtype=torch.long), align_depth=8)
    p = int(name.split("/")[1])
    assert out.shape == x.shape
    assert m.grid == res // (8 * p if name.startswith("SiT") else p)
    assert h.shape == (2, m.grid ** 2, m.blocks[0].adaLN_modulation[1].in_features)


@pytest.mark.parametrize("res", [32, 64])
def test_model_tiny_forward_shapes(res):
    for m in (_tiny_sit(res), _tiny_jit(res)):
        x = torch.randn(2, m.in_channels, m.input_size, m.input_size)
        out, h = m(x, torch.rand(2), torch.tensor([0, 3]), align_depth=3)
        assert out.shape == x.shape and h.shape == (2, m.grid ** 2, 64)
        assert m(x, torch.rand(2), torch.tensor([0, 3]))[1] is None


@pytest.mark.parametrize("align_depth", [1, 2, 3, 4])
def test_model_jit_hidden_excludes_class_tokens(align_depth):
    # class tokens enter before block 2 (index 2); hidden tokens must be the 64 patch
    # tokens either way, and equal to what the blocks computed for those positions.
    torch.manual_seed(0)
    m = _randomize(_tiny_jit(in_context_start=2)).eval()
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 2])
    seen = []
    hook = m.blocks[align_depth - 1].register_forward_hook(lambda mod, inp, out: seen.append(out))
    _, h = m(x, t, y, align_depth=align_depth)
    hook.remove()
    assert h.shape == (2, 64, 64)
    n_ctx = 4 if align_depth > 2 else 0
    assert seen[0].shape[1] == 64 + n_ctx
    torch.testing.assert_close(h, seen[0][:, n_ctx:])


@pytest.mark.parametrize("align_depth", [1, 2, 3])
def test_model_sit_hidden_comes_from_the_named_block(align_depth):
    # on a model deeper than the depth: the tokens after block `align_depth`, not one later
    torch.manual_seed(0)
    m = _randomize(_tiny_sit()).eval()
    seen = []
    hook = m.blocks[align_depth - 1].register_forward_hook(lambda mod, inp, out: seen.append(out))
    _, h = m(torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([1, 2]), align_depth=align_depth)
    hook.remove()
    assert len(m.blocks) > align_depth and torch.equal(h, seen[0])


def test_model_jit_class_tokens_condition_the_output():
    # the in-context class tokens are dropped before the final layer, so they can reach the output
    # only through attention: the gradient to their learned positions must be non-zero
    torch.manual_seed(0)
    m = _randomize(_tiny_jit(), std=0.3).eval()
    m(torch.randn(1, 3, 32, 32), torch.rand(1), torch.tensor([1]))[0].square().sum().backward()
    assert m.in_context_posemb.grad.abs().sum() > 0


def test_model_rope_rotates_pairs_by_position():
    cos, sin = model.rope_tables(head_dim=8, grid=4, prefix=2)
    assert cos.shape == (18, 1, 8) and torch.all(cos[:2] == 1) and torch.all(sin[:2] == 0)
    # token (row 1, col 0): first half of dims rotates
    # with the row (angle 1 * freq), second half not at all
    tok = 2 + 1 * 4 + 0
    assert torch.allclose(cos[tok, 0, :4],
                          torch.cos(torch.tensor([1.0, 1.0, 0.01, 0.01])), atol=1e-6)
    assert torch.allclose(cos[tok, 0, 4:], torch.ones(4))
    # rotating by the table preserves norms (a rotation); x (B, T, heads, hd)
    x = torch.randn(1, 18, 3, 8)
    assert torch.allclose(model.apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    # the swap with the signed sin table is the official
    # rotation of each pair (x1, x2) by its angle, exactly
    x1, x2, c, s = x[..., 0::2], x[..., 1::2], cos[..., 0::2], sin[..., 1::2]
    assert torch.equal(model.apply_rope(x, cos, sin),
                       torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], -1).flatten(-2))


def test_model_sincos_pos_embed_matches_formula():
    pe = model.sincos_pos_embed(8, 3)  # omega = [1, 1e-2]
    r, c = 2, 1
    row = pe[r * 3 + c]
    expect = torch.tensor([math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100),
                           math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100)])
    assert torch.allclose(row, expect, atol=1e-6)


def _model_official_forward(m, x, t, y):
    """SiT's or JiT's forward retyped from the official codes on m's weights, functional ops
    only: DiT's timestep embedding, modulate and adaLN-Zero blocks, timm's attention and MLP,
    JiT's SwiGLU, RMSNorm, in-context tokens and EVA's RoPE (rotate_half), the einsum unpatchify."""
    jit, P = isinstance(m, model.JiT), dict(m.named_parameters())
    lin = lambda a, name: F.linear(a, P[name + ".weight"], P.get(name + ".bias"))
    mod = lambda a, shift, scale: a * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    D, heads, g = m.hidden_size, m.blocks[0].attn.num_heads, m.grid
    hd = D // heads

    def norm(a, name):  # JiT: RMSNorm; SiT: LayerNorm without affine, eps 1e-6
        if not jit:
            return F.layer_norm(a, a.shape[-1:], eps=1e-6)
        return a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6) * P[name + ".weight"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    y_emb = P["y_embedder.embedding_table.weight"][y]
    c = lin(F.silu(lin(emb, "t_embedder.mlp.0")), "t_embedder.mlp.2") + y_emb
    if jit:
        h = F.conv2d(x, P["x_embedder.proj1.weight"], stride=m.patch_size)
        h = F.conv2d(h, P["x_embedder.proj2.weight"], P["x_embedder.proj2.bias"])
    else:
        h = F.conv2d(x, P["x_embedder.proj.weight"], P["x_embedder.proj.bias"], stride=m.patch_size)
    h = h.flatten(2).transpose(1, 2) + P["pos_embed"]  # the table: its own test below
    dim = hd // 2  # EVA: per axis, frequencies repeated in pairs; rows, then columns
    fr = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    fr = torch.einsum("i,f->if", torch.arange(g).float(), fr).repeat_interleave(2, dim=-1)
    fr = torch.cat([fr[:, None].expand(g, g, dim), fr[None].expand(g, g, dim)], -1).flatten(0, 1)

    def rope(q, n_cls):  # q (B, heads, T, hd); class tokens are not rotated
        cos = torch.cat([torch.ones(n_cls, hd), fr.cos()])
        sin = torch.cat([torch.zeros(n_cls, hd), fr.sin()])
        q1, q2 = q.unflatten(-1, (-1, 2)).unbind(-1)
        return q * cos + torch.stack([-q2, q1], -1).flatten(-2) * sin
    n_ctx = 0
    for i in range(len(m.blocks)):
        b = f"blocks.{i}."
        if jit and i == m.in_context_start:
            ctx = y_emb.unsqueeze(1).repeat(1, m.in_context_len, 1) + P["in_context_posemb"]
            h, n_ctx = torch.cat([ctx, h], dim=1), m.in_context_len
        s1, c1, g1, s2, c2, g2 = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=-1)
        a = mod(norm(h, b + "norm1"), s1, c1)
        B, T, _ = a.shape
        q, k, v = lin(a, b + "attn.qkv").reshape(B, T, 3, heads, hd).permute(2, 0, 3, 1, 4)
        if jit:
            q, k = rope(norm(q, b + "attn.q_norm"), n_ctx), rope(norm(k, b + "attn.k_norm"), n_ctx)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)
        h = h + g1.unsqueeze(1) * lin(o, b + "attn.proj")
        a = mod(norm(h, b + "norm2"), s2, c2)
        if jit:
            a1, a2 = lin(a, b + "mlp.w12").chunk(2, dim=-1)
            f = lin(F.silu(a1) * a2, b + "mlp.w3")
        else:
            f = lin(F.gelu(lin(a, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        h = h + g2.unsqueeze(1) * f
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=-1)
    out = lin(mod(norm(h[:, n_ctx:], "final_layer.norm_final"), shift, scale), "final_layer.linear")
    p, C = m.patch_size, m.in_channels
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(len(x), g, g, p, p, C))
    return out.reshape(len(x), C, g * p, g * p)


@pytest.mark.parametrize("build", [_tiny_sit, _tiny_jit])
def test_model_forward_matches_the_official_formulas(build):
    # every trainable weight random (adaLN-Zero would hide the blocks); std 0.1 keeps GELU off
    # its linear and saturated ranges, where the tanh approximation would not show
    m = _randomize(build(), std=0.1).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, m.in_channels, m.input_size, m.input_size, generator=g)
    t, y = torch.tensor([0.3, 0.8]), torch.tensor([1, 10])
    with torch.no_grad():
        got, want = m(x, t, y)[0], _model_official_forward(m, x, t, y)
    assert (got - want).norm() / want.norm() < 2e-6


def test_model_unknown_name_lists_valid():
    with pytest.raises(ValueError, match="SiT-B/2.*JiT-B/16"):
        model.build_model("SiT-Q/2")


def test_model_wrong_input_size_says_so():
    m = _tiny_sit(32)
    with pytest.raises(ValueError, match=r"\(B, 4, 4, 4\).*image_size"):
        m(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]))
    with pytest.raises(ValueError, match="got"):
        _tiny_jit(32)(torch.randn(1, 3, 64, 64), torch.rand(1), torch.tensor([0]))


def test_model_state_dict_keys_are_official_names():
    keys = set(_tiny_sit().state_dict())
    for k in ["x_embedder.proj.weight", "pos_embed", "t_embedder.mlp.0.weight",
              "y_embedder.embedding_table.weight", "blocks.0.attn.qkv.bias",
              "blocks.0.mlp.fc1.weight", "blocks.0.adaLN_modulation.1.weight",
              "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias"]:
        assert k in keys
    keys = set(_tiny_jit().state_dict())
    for k in ["x_embedder.proj1.weight", "x_embedder.proj2.bias", "in_context_posemb",
              "blocks.0.attn.q_norm.weight", "blocks.0.mlp.w12.weight", "blocks.0.mlp.w3.bias",
              "blocks.0.norm1.weight", "final_layer.norm_final.weight"]:
        assert k in keys
    # RoPE tables are derived, not stored (as the official)
    assert not any("rope" in k for k in keys)


def test_model_jit_attention_is_token_major_in_memory(monkeypatch):
    # JiT's q, k, v reach attention as head-major views of token-major
    # tensors: compiled, the q/k norm and RoPE then fuse into one kernel and
    # the attention output needs no copy back (JiT-B/16 trained 1.2% faster)
    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(model.F, "scaled_dot_product_attention",
                        lambda q, k, v: seen.append((q, k, v)) or sdpa(q, k, v))
    _tiny_jit()(torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 2]))
    assert (len(seen) == 4
            and all(t.transpose(1, 2).stride(-2) == t.shape[-1] for qkv in seen for t in qkv))


def test_model_sit_small_size_works():
    # the official SiT-S builds its final layer 768 wide and crashes; ours runs
    with torch.device("meta"):
        m = model.build_model("SiT-S/2")
        out, _ = m(torch.empty(1, 4, 32, 32), torch.rand(1), torch.zeros(1, dtype=torch.long))
    assert out.shape == (1, 4, 32, 32)

# =============================================================================
# align.py


def test_align_projector_sizes():
    assert (sum(p.numel() for p in align.make_projector(768, 768, conv=True).parameters())
            == 5_309_184)
    assert (sum(p.numel() for p in align.make_projector(768, 768, conv=False).parameters())
            == 7_344_896)


def test_align_mlp_projector_is_linear_silu_linear_silu_linear():
    torch.manual_seed(0)
    p = align.make_projector(16, 8, conv=False)
    h = torch.randn(2, 5, 16)
    (w1, b1), (w2, b2), (w3, b3) = [(m.weight, m.bias) for m in p.modules()
                                    if isinstance(m, torch.nn.Linear)]
    want = F.linear(F.silu(F.linear(F.silu(F.linear(h, w1, b1)), w2, b2)), w3, b3)
    assert torch.allclose(p(h), want, atol=1e-6)


def test_align_conv_projector_keeps_grid_and_is_local():
    torch.manual_seed(0)
    p = align.make_projector(8, 5, conv=True)
    h = torch.randn(2, 16, 8)
    out = p(h)
    assert out.shape == (2, 16, 5)
    # token (0,0) sees only its 3x3 neighbourhood:
    # changing token (3,3) leaves it alone, (1,1) does not
    h2 = h.clone()
    h2[:, 15] += 1
    assert torch.allclose(p(h2)[:, 0], out[:, 0])
    h2[:, 5] += 1
    assert not torch.allclose(p(h2)[:, 0], out[:, 0])


def test_align_1x1_conv_equals_linear_map():
    torch.manual_seed(0)
    p = align.ConvProjector(8, 5, kernel=1)
    h = torch.randn(2, 16, 8)
    w, b = p.projection_layer.weight[:, :, 0, 0], p.projection_layer.bias
    torch.testing.assert_close(p(h), h @ w.T + b)


def test_align_conv_projector_equals_conv_on_row_major_grid():
    torch.manual_seed(0)
    p = align.make_projector(8, 5, conv=True)
    h = torch.randn(2, 12, 12, 8)  # token t = 12 * row + col
    ref = F.conv2d(h.permute(0, 3, 1, 2).contiguous(), p.projection_layer.weight,
                   p.projection_layer.bias, padding=1)
    torch.testing.assert_close(p(h.reshape(2, 144, 8)), ref.flatten(2).transpose(1, 2))


def test_align_conv_projector_rejects_non_square_grid():
    with pytest.raises(RuntimeError, match="invalid for input of size"):  # the grid's reshape
        align.make_projector(8, 5, conv=True)(torch.randn(1, 12, 8))


def test_align_spatial_norm_gamma_one_is_zscore():
    torch.manual_seed(0)
    z = torch.randn(3, 64, 10) * 4 + 2
    out = align.spatial_norm(z, 1.0)
    assert torch.allclose(out.mean(1), torch.zeros(3, 10), atol=1e-5)
    assert torch.allclose(out.std(1), torch.ones(3, 10), atol=1e-4)


def test_align_spatial_norm_keeps_part_of_the_mean():
    torch.manual_seed(0)
    z = torch.randn(3, 64, 10) + 5
    gamma = 0.6
    out = align.spatial_norm(z, gamma)
    std = z.std(1, keepdim=True) + 1e-6
    assert torch.allclose(out.mean(1, keepdim=True) * std,
                          (1 - gamma) * z.mean(1, keepdim=True), atol=1e-4)


def test_align_gamma_zero_still_divides_by_the_std_and_none_is_repa():
    torch.manual_seed(0)
    z, h = torch.randn(2, 16, 8) * torch.rand(8) * 3 + 1, torch.randn(2, 16, 8)
    scaled = z / (z.std(1, keepdim=True) + 1e-6)  # per channel: not a cosine-invariant scale
    loss = align.alignment_loss(nn.Identity(), h, z, 0.0)
    assert torch.allclose(loss, align.repa_loss(h, scaled), atol=1e-6)
    assert not torch.allclose(loss, align.repa_loss(h, z), atol=1e-3)
    assert torch.equal(align.alignment_loss(nn.Identity(), h, z, None), align.repa_loss(h, z))


def test_align_spatial_norm_matches_a_loop_and_stays_finite_on_a_constant_channel():
    # per image and channel over the tokens, by loops: (z - gamma mean) / (unbiased std + 1e-6);
    # a channel constant over the tokens has std 0, and the 1e-6 keeps it finite
    torch.manual_seed(0)
    z, gamma = torch.randn(2, 9, 3) * 2 + 1, 0.6
    z[1, :, 2] = 2.0
    got = align.spatial_norm(z, gamma)
    for b in range(2):
        for c in range(3):
            v = z[b, :, c].tolist()
            mean = sum(v) / len(v)
            std = math.sqrt(sum((a - mean) ** 2 for a in v) / (len(v) - 1))
            want = torch.tensor([(a - gamma * mean) / (std + 1e-6) for a in v])
            torch.testing.assert_close(got[b, :, c], want, rtol=1e-5, atol=1e-5)
    assert got[1, 0, 2].item() == pytest.approx(0.8e6, rel=1e-6)


def test_align_mlp_projector_starts_xavier_uniform_with_zero_biases():
    # REPA's init: U(-a, a) weights, a = sqrt(6 / (fan_in + fan_out)), so mean |w| = a / 2
    torch.manual_seed(0)
    layers = [m for m in align.MLPProjector(64, 32, width=256).modules()
              if isinstance(m, nn.Linear)]
    for m in layers:
        a = math.sqrt(6 / (m.in_features + m.out_features))
        w = m.weight.abs()
        assert 0.97 * a < w.max() <= a and w.mean().item() == pytest.approx(a / 2, rel=0.03)
        assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_align_spatial_norm_is_fp32():
    z = torch.randn(2, 16, 4).bfloat16()
    assert align.spatial_norm(z, 0.8).dtype == torch.float32


def test_align_repa_loss_identity_and_scale_invariance():
    torch.manual_seed(0)
    z = torch.randn(2, 16, 8)
    assert torch.allclose(align.repa_loss(z, z), torch.tensor(-1.0))
    h = torch.randn(2, 16, 8)
    assert torch.allclose(align.repa_loss(h * 7.0, z * 0.1), align.repa_loss(h, z), atol=1e-6)
    assert torch.allclose(align.repa_loss(-z, z), torch.tensor(1.0))
    with pytest.raises(ValueError, match="differ"):
        align.repa_loss(h, z[:, :8])


def test_align_defaults_are_the_papers():
    assert align.IREPA["SiT"] == dict(proj="conv", gamma=0.6, coeff=1.0)
    assert align.IREPA["JiT"] == dict(proj="conv", gamma=0.8, coeff=0.5)
    assert align.REPA["SiT"]["coeff"] == 0.5 and align.REPA["SiT"]["proj"] == "mlp"
    assert align.PROJ_KERNEL == 3
    assert [align.encoder_depth_default(n)
            for n in ("SiT-B/2", "SiT-XL/2", "JiT-B/16", "JiT-L/16")] == [4, 8, 4, 8]


def test_align_grep_prints_the_change():
    src = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "align.py")).read()
    tagged = [line for line in src.splitlines() if "iREPA" in line
              and not line.lstrip().startswith(("#", '"'))]
    assert (any("Conv2d" in line for line in tagged)
            and any("gamma * z.mean" in line for line in tagged))


def test_align_help_answers():
    import subprocess
    r = subprocess.run([sys.executable,
                        os.path.join(os.path.dirname(os.path.abspath(__file__)), "align.py"),
                        "--help"],
                       capture_output=True, text=True, timeout=120)
    assert (r.returncode == 0 and r.stdout.startswith("usage: align.py") and "REPA" in r.stdout
            and "MLPProj" not in r.stdout)


@pytest.mark.parametrize("family,conv", [("sit", False), ("sit", True), ("jit", True)])
def test_align_model_and_projector_learn_tiny_batch(family, conv):
    # 50 steps on one fixed batch: both the denoising and the alignment losses go down
    torch.manual_seed(0)
    m = _tiny_sit() if family == "sit" else _tiny_jit()
    proj = align.make_projector(64, 12, conv=conv)
    x = torch.randn(4, m.in_channels, m.input_size, m.input_size)
    z = torch.randn(4, m.grid ** 2, 12).cumsum(1)  # a target with spatial structure
    t, y, eps = torch.rand(4), torch.tensor([0, 1, 2, 3]), torch.randn_like(x)
    opt = torch.optim.AdamW(list(m.parameters()) + list(proj.parameters()), lr=1e-3)
    first = last = None
    for _ in range(50):
        out, h = m((1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps, t, y, align_depth=2)
        dl = ((out - (eps - x)) ** 2).mean()
        rl = align.alignment_loss(proj, h, z, gamma=0.6 if conv else None)
        opt.zero_grad()
        (dl + rl).backward()
        opt.step()
        first = first or (dl.item(), rl.item())
        last = (dl.item(), rl.item())
    assert last[0] < 0.7 * first[0] and last[1] < first[1] - 0.2

# =============================================================================
# train.py

import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import data  # noqa: E402
import train  # noqa: E402
import runs  # noqa: E402

_ROOT = os.path.dirname(os.path.abspath(__file__))
# a tiny, fast run: the demo JiT at 32 px (2x2 tokens), 8 images per step, no sample grids
_TINY = ["--model", "JiT-demo/16", "--image-size", "32", "--batch-size", "8",
         "--num-generated", "64", "--log-every", "2", "--sample-every", "0", "--lr", "1e-3",
         "--warmup-steps", "2", "--no-compile"]
# training subprocesses stay on the CPU on a GPU machine too:
# exact resume needs deterministic kernels, and the 2-process DDP test must not ask for a second GPU
_CPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def _train_cmd(*extra):
    return [sys.executable, os.path.join(_ROOT, "train.py"), *_TINY, *extra]


def _free_port():  # so that two suites can run side by side
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_train_generated_images_deterministic_and_class_coloured():
    a, la = data.generated_images(20, 32, seed=3)
    b, lb = data.generated_images(20, 32, seed=3)
    assert (a.dtype == torch.uint8 and a.shape == (20, 3, 32, 32) and torch.equal(a, b)
            and torch.equal(la, lb))
    assert sorted(set(la.tolist())) == list(range(data.NUM_GENERATED_CLASSES))
    # each class has its own colour: the most saturated pixels of a red-class image are red
    red = a[la == 0].float()
    assert (red[:, 0] - red[:, 2]).amax(dim=(1, 2)).min() > 100


def test_train_center_crop_is_adm():
    from PIL import Image
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 700, 3), dtype=np.uint8))
    out = data.center_crop(img, 64)
    assert out.shape == (64, 64, 3)
    # reference: two box halvings (700x300 -> 350x150 -> 175x75),
    # bicubic to short side 64, center crop
    ref = img.resize((350, 150), Image.BOX).resize((175, 75), Image.BOX)
    ref = np.asarray(ref.resize((round(175 * 64 / 75), 64), Image.BICUBIC))
    x0 = (ref.shape[1] - 64) // 2
    assert np.array_equal(out, ref[:, x0:x0 + 64])


def test_train_center_crop_rounds_the_resized_side():
    from PIL import Image
    # 234 x 100 -> bicubic to short side 64: the long side is 149.76, 150 rounded (149 truncated)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 234, 3), np.uint8))
    ref = np.asarray(img.resize((150, 64), Image.BICUBIC))
    assert np.array_equal(data.center_crop(img, 64), ref[:, 43:107])


def test_train_batches_split_each_global_batch_over_the_ranks():
    # 24 images (1x2 pixels, telling index and flip apart) in batches of 8: on 2 ranks the parts of
    # step s hold 1 rank's batch s; an epoch sees each image once, the next reshuffles
    n, B = 24, 8
    images, labels = np.arange(2 * n).reshape(n, 1, 1, 2), np.arange(n)
    one = data.Batches(images, labels, labels * 10.0, B, 0, 1, seed=3, flip=True)
    two = [data.Batches(images, labels, labels * 10.0, B, r, 2, seed=3, flip=True) for r in (0, 1)]
    seen, flips = [], 0
    for step in range(2 * n // B):  # two epochs
        x, y, lat = one[step]
        assert torch.equal(x.amin((1, 2, 3)) // 2, y) and torch.equal(lat, y * 10.0)
        parts = [b[step] for b in two]
        for px, py, plat in parts:  # each image with its label and latent, flipped or not
            assert torch.equal(px.amin((1, 2, 3)) // 2, py) and torch.equal(plat, py * 10.0)
        assert sorted(torch.cat([p[1] for p in parts]).tolist()) == sorted(y.tolist())
        seen.append(y)
        flips += (x[..., 0] > x[..., 1]).sum().item()
    assert sorted(torch.cat(seen[:3]).tolist()) == list(range(n))
    assert sorted(torch.cat(seen[3:]).tolist()) == list(range(n))
    assert not torch.equal(torch.cat(seen[:3]), torch.cat(seen[3:]))
    assert 12 <= flips <= 36  # random flips, p 0.5, of 48 images


def test_train_lr_warms_up_linearly_from_its_first_step(tmp_path):
    train.main([*_TINY, "--steps", "3", "--log-every", "1", "--ckpt-every", "3",
                "--out-dir", str(tmp_path)])
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "log.jsonl")]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3])  # step s of 2 warm-up steps: lr min(1, s / 2)


def test_train_jit_recipe_scales_the_lr_by_the_batch_and_warms_up_for_five_epochs(tmp_path):
    # JiT's recipe: lr 5e-5 * batch / 256; warm-up 5 epochs, here of 64 images in batches of 8
    assert train.get_args(["--model", "JiT-B/16", "--batch-size", "512"]).lr == 1e-4
    i = _TINY.index("--warmup-steps")
    tiny = _TINY[:i] + _TINY[i + 2:]
    train.main([*tiny, "--steps", "2", "--log-every", "1", "--ckpt-every", "2",
                "--out-dir", str(tmp_path)])
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "log.jsonl")]
    assert lrs == pytest.approx([1e-3 / 40, 2e-3 / 40])


def test_train_resume_after_sigkill_is_bitwise_identical(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd("--steps", "12", "--ckpt-every", "2", "--out-dir", str(full)),
                   check=True, capture_output=True, env=_CPU)
    proc = subprocess.Popen(_train_cmd("--steps", "12", "--ckpt-every", "2",
                                       "--out-dir", str(killed)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_CPU)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "0000002.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(os.listdir(killed / "checkpoints"))
    assert "0000012.pt" not in done, "the run finished before it could be killed"
    subprocess.run(_train_cmd("--resume", str(killed)), check=True, capture_output=True, env=_CPU)
    a, b = (_state(full / "checkpoints" / "0000012.pt"),
            _state(killed / "checkpoints" / "0000012.pt"))
    for key in ("model", "ema", "ema2"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    la = [json.loads(line) for line in open(full / "log.jsonl")]
    lb = [json.loads(line) for line in open(killed / "log.jsonl")]
    # what the killed run logged past its checkpoint is gone: one clean log
    assert [(r["step"], r["loss"]) for r in la] == [(r["step"], r["loss"]) for r in lb]


def test_train_resume_from_an_older_checkpoint_of_a_moved_run(tmp_path, capsys, monkeypatch):
    run, moved = tmp_path / "run", tmp_path / "moved"
    train.main([*_TINY, "--steps", "6", "--ckpt-every", "2", "--out-dir", str(run)])
    before = [(r["step"], r["loss"]) for r in map(json.loads, open(run / "log.jsonl"))]
    os.rename(run, moved)
    with open(moved / "log.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # a record cut by a kill
    later = {n: (moved / "checkpoints" / n).read_bytes() for n in ("0000004.pt", "0000006.pt")}
    train.main(["--resume", str(moved / "checkpoints" / "0000002.pt")])
    assert not run.exists()  # the run goes on in the folder its checkpoint is in
    # the checkpoints past step 2 and the whole log are kept aside, byte for byte
    aside, = glob.glob(str(moved / "after-step-2-*"))
    assert {n: open(os.path.join(aside, n), "rb").read() for n in later} == later
    assert open(os.path.join(aside, "log.jsonl")).read().endswith('{"step": 8, "lo')
    # steps 2, 4, 6 once
    assert [(r["step"], r["loss"]) for r in map(json.loads, open(moved / "log.jsonl"))] == before
    with pytest.raises(SystemExit):
        train.main(["--resume", str(moved)])
    assert "at step 6 already: pass --steps above it" in capsys.readouterr().err
    # the class count defines the model: refused before anything is built
    with pytest.raises(SystemExit):
        train.main(["--resume", str(moved), "--num-classes", "20", "--steps", "8"])
    assert "--num-classes 20 differs from the run's 10" in capsys.readouterr().err
    # a relative checkpoint path: the run folder is still the one above checkpoints/
    monkeypatch.chdir(moved)
    train.main(["--resume", os.path.join("checkpoints", "0000006.pt"), "--steps", "8"])
    assert (moved / "checkpoints" / "0000008.pt").exists()
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit):
        train.main(["--resume", str(tmp_path / "junk.pt")])
    assert "not a readable train.py checkpoint" in capsys.readouterr().err


def test_train_resume_with_only_resume_flag_restores_config(tmp_path):
    # the checkpoint's configuration (encoder, projector, ...) comes back;
    # flags given now (--steps) win
    run = str(tmp_path / "run")
    common = ["--encoder", "dinov2-vit-s", "--encoder-weights", "random", "--irepa",
              "--ckpt-every", "2"]
    with pytest.warns(UserWarning, match="RANDOM"):
        train.main([*_TINY, *common, "--steps", "2", "--out-dir", run])
        train.main(["--resume", run, "--steps", "4"])
    ck = _state(os.path.join(run, "checkpoints", "0000004.pt"))
    assert (ck["args"]["encoder"] == "dinov2-vit-s" and ck["args"]["proj"] == "conv"
            and ck["proj"] is not None)
    # as fresh
    assert (train.get_args(["--resume", run, "--steps", "6", "--spnorm-gamma", "-1"]).spnorm_gamma
            is None)
    assert [r["step"] for r in map(json.loads, open(os.path.join(run, "log.jsonl")))] == [2, 4]


def test_train_compiles_by_default_on_gpu_only(monkeypatch):
    tiny = ["--model", "JiT-demo/16"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.get_args(tiny).compile is False  # CPU: compiling the step takes minutes
    assert train.get_args([*tiny, "--compile"]).compile is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train.get_args(tiny).compile is True
    assert train.get_args([*tiny, "--no-compile"]).compile is False


def test_train_checkpoint_write_killed_leaves_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoints" / "0000001.pt")
    data.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def dying_save(obj, f):
        open(f, "wb").write(b"half a checkp")
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        data.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(_state(path)["w"], torch.ones(3))
    assert data.find_checkpoint(str(tmp_path)) == path  # the .tmp leftover is never picked up


def test_train_sigkill_during_checkpoint_write_keeps_a_loadable_checkpoint(tmp_path):
    # a real SIGKILL while a large checkpoint is being written:
    # the final name always holds a whole file
    path = tmp_path / "checkpoints" / "0000001.pt"
    data.save_checkpoint({"step": 1, "w": torch.ones(3)}, str(path))
    code = (f"import sys, torch; sys.path.insert(0, {_ROOT!r}); import data; "
            f"data.save_checkpoint({{'step': 2, 'w': torch.zeros(64, 1024, 1024)}}, {str(path)!r})")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while not os.path.exists(str(path) + ".tmp") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the old checkpoint, or (if the write won the race) the whole new one
    assert _state(path)["step"] in (1, 2)
    assert data.find_checkpoint(str(tmp_path)) == str(path)


@pytest.mark.parametrize("objective", [[], ["--objective", "meanflow", "--model", "SiT-demo/4"]])
def test_train_ddp_gloo_two_processes(tmp_path, objective):
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}",
                        os.path.join(_ROOT, "train.py"), *_TINY, *objective, "--steps", "6",
                        "--ckpt-every", "6", "--out-dir", str(out)], capture_output=True, text=True,
                       timeout=300, env=_CPU)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "replicas identical across 2 ranks: True" in r.stdout
    assert os.listdir(out / "checkpoints") == ["0000006.pt"]
    assert len(open(out / "log.jsonl").readlines()) == 3


def test_train_ddp_batch_not_divisible(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}",
                        os.path.join(_ROOT, "train.py"), *_TINY, "--batch-size", "7",
                        "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env=_CPU)
    assert r.returncode != 0 and "not divisible by the world size 2" in r.stderr


def test_train_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    forward = train.Objective.forward
    calls = {"n": 0}

    def poisoned(self, x, y, target):
        calls["n"] += 1
        loss, d, r = forward(self, x, y, target)
        return (loss * float("nan"), d, r) if calls["n"] > 5 else (loss, d, r)
    monkeypatch.setattr(train.Objective, "forward", poisoned)
    with pytest.raises(SystemExit, match="loss is nan around step 6.*0000004.pt"):
        train.main([*_TINY, "--steps", "12", "--ckpt-every", "4", "--out-dir", str(tmp_path)])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["0000004.pt"]
    assert all(torch.isfinite(v).all()
               for v in _state(tmp_path / "checkpoints" / "0000004.pt")["model"].values())


def test_prepare_refuses_a_folder_without_readable_images(tmp_path):
    (tmp_path / "data" / "class0").mkdir(parents=True)
    for files in ([], ["broken.png"]):  # no files; only an unreadable one
        for f in files:
            (tmp_path / "data" / "class0" / f).write_bytes(b"\x89PNG not really")
        with pytest.raises(SystemExit, match="no readable images under"):
            data.prepare(str(tmp_path / "data"), str(tmp_path / "prep"), 32, None, None, "cpu")
        assert not os.path.exists(tmp_path / "prep" / "meta.json")  # nothing left as prepared


def test_train_more_classes_than_num_classes_is_refused_before_preparing(tmp_path):
    # labels past the embedding's rows would fail inside the first step, after the preparation
    for k in range(3):
        (tmp_path / "data" / f"class{k}").mkdir(parents=True)
    for flags, classes in ([["--data-path", str(tmp_path / "data")], 3],
                           [["--num-generated", "64"], 10]):
        args = train.get_args([*_TINY, *flags, "--num-classes", "2",
                               "--out-dir", str(tmp_path / "run")])
        with pytest.raises(SystemExit, match=f"the data has {classes} classes but "
                           f"--num-classes is 2: pass at least {classes}"):
            runs.check_run(args, 1)
    assert sorted(os.listdir(tmp_path)) == ["data"]  # nothing prepared, no run folder
    runs.check_run(train.get_args([*_TINY, "--num-classes", "10"]), 1)


def test_train_image_folder_with_corrupt_file(tmp_path, capsys, monkeypatch):
    import warnings
    from PIL import Image
    imgs, labels = data.generated_images(16, 40, seed=0)
    for i, (im, k) in enumerate(zip(imgs, labels)):
        os.makedirs(tmp_path / "data" / f"class{k.item() % 2}", exist_ok=True)
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(
            tmp_path / "data" / f"class{k.item() % 2}" / f"{i}.png")
    bad = tmp_path / "data" / "class1" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    deep = tmp_path / "data" / "class0" / "deep.png"
    # 16-bit: convert("RGB") would make it white
    Image.fromarray(np.full((40, 40), 300, np.uint16)).save(deep)
    run = lambda out: [*_TINY, "--num-classes", "2", "--steps", "2", "--ckpt-every", "2",
                       "--num-workers", "0", "--out-dir", str(tmp_path / out)]
    prep = ["--prepared-dir", str(tmp_path / "prep")]
    train.main([*run("r1"), *prep, "--data-path", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert str(bad) in err and f"{deep}: I" in err and "convert the file to 8-bit" in err
    assert np.load(tmp_path / "prep" / "images.npy").shape == (16, 3, 32, 32)
    assert os.path.exists(tmp_path / "r1" / "checkpoints" / "0000002.pt")
    # another dataset must not reuse these arrays
    shutil.copytree(tmp_path / "data", tmp_path / "other")
    with pytest.raises(SystemExit,
                       match=f"holds {tmp_path / 'data'} at 32 px, not {tmp_path / 'other'}"):
        train.main([*run("r2"), *prep, "--data-path", str(tmp_path / "other")])
    # as after a preparation killed before its end: prepared again
    os.remove(tmp_path / "prep" / "meta.json")
    train.main([*run("r2"), *prep, "--data-path", str(tmp_path / "other")])
    assert json.load(open(tmp_path / "prep" / "meta.json"))["source"] == str(tmp_path / "other")
    kept = {f: (tmp_path / "prep" / f).read_bytes() for f in os.listdir(tmp_path / "prep")}
    sit = [*run("r3"), "--data-path", str(tmp_path / "other"), "--model", "SiT-S/2",
           "--vae-weights", "random"]
    with pytest.warns(UserWarning, match="RANDOM"):
        # SiT needs the VAE's latents: its own folder beside the run; JiT's arrays stay as they were
        train.main(sit)
    own = tmp_path / "prepared-other-32-random-vae"
    assert json.load(open(own / "meta.json"))["vae"] == "random"
    assert np.load(own / "latents.npy").shape == (16, 8, 4, 4)
    assert kept == {f: (tmp_path / "prep" / f).read_bytes() for f in os.listdir(tmp_path / "prep")}
    # JiT's arrays named for a SiT run: refused, kept
    with pytest.raises(SystemExit, match="no VAE latents"):
        train.main([*sit, "--out-dir", str(tmp_path / "r4"), *prep])
    meta = json.load(open(own / "meta.json"))
    json.dump({**meta, "vae": "/elsewhere/vae.safetensors"}, open(own / "meta.json", "w"))
    with warnings.catch_warnings(record=True) as caught, \
            pytest.raises(SystemExit, match="latents of the VAE /else"):
        warnings.simplefilter("always")
        train.main([*sit, "--out-dir", str(tmp_path / "r5")])
    # refused before the (random) VAE is built
    assert not [w for w in caught if "RANDOM" in str(w.message)]
    # a --resume that changes the model is refused before any
    # VAE encoding or preparation: the arrays stay as they are
    monkeypatch.setattr(train, "posterior",
                        lambda *a, **k: pytest.fail("VAE encoding before the refusal"))
    monkeypatch.setattr(data, "prepare",
                        lambda *a, **k: pytest.fail("preparation before the refusal"))
    with pytest.raises(SystemExit):
        train.main(["--resume", str(tmp_path / "r1"), "--model", "SiT-S/2",
                    "--vae-weights", "random", "--steps", "4"])
    assert "--model SiT-S/2 differs from the run's JiT-demo/16" in capsys.readouterr().err
    assert kept == {f: (tmp_path / "prep" / f).read_bytes() for f in os.listdir(tmp_path / "prep")}
    # a run moved with the prepared folder beside it resumes on those arrays, preparing nothing
    json.dump(meta, open(own / "meta.json", "w"))
    os.makedirs(tmp_path / "moved")
    for name in ("r3", own.name):
        os.rename(tmp_path / name, tmp_path / "moved" / name)
    with pytest.warns(UserWarning, match="RANDOM"):
        train.main(["--resume", str(tmp_path / "moved" / "r3"), "--steps", "4"])
    assert os.path.exists(tmp_path / "moved" / "r3" / "checkpoints" / "0000004.pt")
    # beside it, other latents: a given --prepared-dir is used, not refused
    monkeypatch.undo()
    os.rename(tmp_path / "moved" / own.name, own)
    json.dump({**meta, "vae": "/elsewhere/vae.safetensors"}, open(own / "meta.json", "w"))
    with pytest.warns(UserWarning, match="RANDOM"):
        train.main([*sit, "--out-dir", str(tmp_path / "r5"), "--prepared-dir",
                    str(tmp_path / "prep5")])
    assert json.load(open(tmp_path / "prep5" / "meta.json"))["vae"] == "random"


def test_train_fresh_run_into_a_run_folder_is_refused_and_start_over_moves_it_aside(tmp_path,
                                                                                    capsys):
    run = tmp_path / "run"
    train.main([*_TINY, "--steps", "2", "--ckpt-every", "2", "--out-dir", str(run)])
    first = {p: (run / p).read_bytes() for p in ("log.jsonl", "checkpoints/0000002.pt")}
    with pytest.raises(SystemExit, match=f"--out-dir {run} holds a run: --resume {run}"):
        train.main([*_TINY, "--steps", "2", "--ckpt-every", "2",
                    "--out-dir", str(run), "--seed", "1"])
    # nothing overwritten, nothing appended
    assert first == {p: (run / p).read_bytes() for p in first}
    train.main([*_TINY, "--steps", "2", "--ckpt-every", "2", "--out-dir", str(run), "--seed", "1",
                "--start-over"])
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    # moved, not deleted
    assert len(aside) == 1 and first == {p: (aside[0] / p).read_bytes() for p in first}
    assert f"moved the old run in {run} to {aside[0]}" in capsys.readouterr().out
    assert (len(open(run / "log.jsonl").readlines()) == 1
            and (run / "checkpoints" / "0000002.pt").exists())
    mine = tmp_path / "mine"  # a folder of the user's with a file named as a run's
    mine.mkdir()
    (mine / "curves.png").write_text("the user's")
    with pytest.raises(SystemExit, match="holds a run"):
        train.main([*_TINY, "--steps", "2", "--out-dir", str(mine)])
    assert os.listdir(mine) == ["curves.png"]
    with pytest.raises(SystemExit, match="curves.png is a file, not a folder"):
        train.main([*_TINY, "--steps", "2", "--out-dir", str(mine / "curves.png")])


def test_train_default_run_folders_of_repa_and_irepa_differ():
    enc = ["--encoder", "dinov2-vit-b", "--model", "SiT-B/2"]
    folders = {train.get_args(enc).out_dir, train.get_args([*enc, "--irepa"]).out_dir,
               train.get_args([]).out_dir}
    assert folders == {os.path.join("out", "SiT-B-2-dinov2-vit-b-repa"),
                       os.path.join("out", "SiT-B-2-dinov2-vit-b-irepa"),
                       os.path.join("out", "JiT-demo-16-none")}


def test_train_damaged_newest_checkpoint_names_the_newest_good_one(tmp_path, capsys):
    run = tmp_path / "run"
    train.main([*_TINY, "--steps", "6", "--ckpt-every", "2", "--out-dir", str(run)])
    newest = run / "checkpoints" / "0000006.pt"
    newest.write_bytes(newest.read_bytes()[:5000])  # cut, as by a full disk
    with pytest.raises(SystemExit):
        train.main(["--resume", str(run), "--steps", "8"])
    err = capsys.readouterr().err
    good = run / "checkpoints" / "0000004.pt"
    assert (f"{newest} is not a readable" in err
            and f"the newest good one is {good}: pass --resume {good}" in err)
    train.main(["--resume", str(good), "--steps", "8"])  # the command it names works
    assert (run / "checkpoints" / "0000008.pt").exists()


def test_train_resume_says_file_step_and_each_changed_setting(tmp_path, capsys):
    run = tmp_path / "run"
    train.main([*_TINY, "--steps", "2", "--ckpt-every", "2", "--out-dir", str(run)])
    capsys.readouterr()
    train.main(["--resume", str(run), "--steps", "4", "--lr", "2e-3"])
    out = capsys.readouterr().out
    assert f"resuming from {run / 'checkpoints' / '0000002.pt'} at step 2" in out
    assert "resume changes --lr: 0.001 -> 0.002" in out and "resume changes --steps: 2 -> 4" in out
    # the global batch sets the data order: exact resume could not hold
    with pytest.raises(SystemExit):
        train.main(["--resume", str(run), "--steps", "6", "--batch-size", "16"])
    assert "--batch-size 16 differs from the run's 8" in capsys.readouterr().err
    assert not (run / "checkpoints" / "0000006.pt").exists()
    # a run from before --objective existed: it was a flow run
    ck = _state(run / "checkpoints" / "0000004.pt")
    ck["args"] = {k: v for k, v in ck["args"].items() if not k.startswith(("objective", "mf_"))}
    del ck["checksum"]  # nor had its checkpoints a checksum (those without one still load)
    torch.save(ck, run / "checkpoints" / "0000004.pt")
    train.main(["--resume", str(run), "--steps", "5", "--objective", "flow"])
    assert (run / "checkpoints" / "0000005.pt").exists()


def test_train_loads_checkpoints_as_data(tmp_path, capsys):
    run = tmp_path / "run"
    train.main([*_TINY, "--steps", "2", "--ckpt-every", "2", "--out-dir", str(run)])
    ck = _state(run / "checkpoints" / "0000002.pt")
    ck["args"]["note"] = _Boom(str(tmp_path / "ran"))  # a pickle that would run code when loaded
    torch.save(ck, run / "checkpoints" / "0000002.pt")
    with pytest.raises(SystemExit):
        train.main(["--resume", str(run), "--steps", "4"])
    assert (not (tmp_path / "ran").exists()
            and "not a readable train.py checkpoint" in capsys.readouterr().err)


def test_train_missing_weights_is_one_line_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main([*_TINY, "--steps", "1", "--encoder", "dinov2-vit-s",
                    "--encoder-weights", str(tmp_path / "no.pth"),
                    "--out-dir", str(tmp_path / "run")])
    assert str(e.value) == f"--encoder-weights {tmp_path / 'no.pth'}: no such file"
    assert not (tmp_path / "run").exists()


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_train_used_by_command_finds_imagenet_in_the_official_layout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    used_by = ["--encoder", "dinov2-vit-s", "--encoder-weights", "random", "--irepa"]
    assert (train.get_args(used_by).model == "JiT-demo/16"
            and train.get_args(used_by).data_path is None)
    imgs, labels = data.generated_images(16, 32, seed=0)
    from PIL import Image
    for i, (im, k) in enumerate(zip(imgs, labels)):  # a tiny ImageNet: 2 class folders
        os.makedirs(tmp_path / "data" / "imagenet" / "train" / f"n{k.item() % 2}", exist_ok=True)
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(
            tmp_path / "data/imagenet/train" / f"n{k.item() % 2}" / f"{i}.png")
    args = train.get_args(used_by)
    # the paper's run
    assert args.data_path == os.path.join("data", "imagenet", "train") and args.model == "SiT-B/2"
    # bare: the demo
    assert train.get_args([]).data_path is None and train.get_args([]).model == "JiT-demo/16"
    with pytest.warns(UserWarning, match="RANDOM"):  # and it trains on those folders
        train.main([*used_by, "--model", "JiT-demo/16", "--image-size", "32", "--batch-size", "8",
                    "--num-classes", "2", "--steps", "1", "--sample-every", "0", "--no-compile",
                    "--num-workers", "0"])
    assert f"data: {os.path.join('data', 'imagenet', 'train')}" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "data")
    # no ImageNet: says it trains the demo
    train.main([*_TINY, "--steps", "1", "--out-dir", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert ("generated shapes, the offline demo's data" in out
            and "--data-path /imagenet/train" in out)


@pytest.mark.parametrize("argv,msg", [
    (["--model", "SiT-Q/2"], "--model: invalid choice: 'SiT-Q/2'"),
    (["--model", "SiTB2"], "--model: invalid choice: 'SiTB2'"),
    (["--encoder", "dinov9"], "--encoder: invalid choice: 'dinov9'"),
    (["--model", "JiT-B/32", "--image-size", "256", "--encoder", "dinov2-vit-b"], "8x8 token grid"),
    (["--data-path", "/does/not/exist"], "no --data-path /does/not/exist"),
    (["--image-size", "60"], "--image-size 60: JiT-demo/16 needs a multiple of 16"),
    (["--encoder", "dinov2-vit-s", "--encoder-weights", "random", "--encoder-depth", "99"],
     "has 6 blocks"),
    (["--batch-size", "0"], "--batch-size: must be at least 1"),
    (["--seed", "-1"], "--seed: must be at least 0"),
    (["--irepa"], "--irepa aligns to an encoder: pass --encoder NAME"),
    (["--lr", "-1"], "--lr: must be at least 0.0"),
    (["--num-generated", "3"], "--num-generated 3 is below --batch-size 64"),
    (["--ema", "0.9,abc"], "--ema: invalid decays value"),
    (["--ema", "0.9,0.99,0.999"], "give one or two decays"),
    (["--objective", "meanflow", "--mf-ratio", "1.5"], "--mf-ratio: give a fraction in [0, 1]"),
    (["--objective", "meanflow", "--mf-interval", "0.8", "0.2"],
     "--mf-interval: LOW is above HIGH"),
    (["--objective", "meanflow", "--mf-weight", "1", "-0.1"], "--mf-weight: must be at least 0.0"),
    # an abbreviation would be overridden
    (["--resume", "out/x", "--step", "4"], "unrecognized arguments: --step"),
    (["--resume", "out/x", "--start-over"],
     "argument --start-over: not allowed with argument --resume"),
])
def test_train_bad_input_fails_before_training(argv, msg, tmp_path, capsys):
    with pytest.raises((SystemExit, ValueError)) as err:  # argparse errors print to stderr
        train.main([*argv, "--out-dir", str(tmp_path), "--steps", "1"])
    assert msg in str(err.value) + capsys.readouterr().err
    assert not os.path.exists(tmp_path / "checkpoints")


def test_train_sample_grid_written(tmp_path, capsys):
    train.main([*_TINY, "--steps", "2", "--ckpt-every", "2", "--sample-every", "2",
                "--out-dir", str(tmp_path)])
    assert (f"sampling 64 images from the EMA for {tmp_path / 'samples' / '0000002.png'}"
            in capsys.readouterr().out)
    from PIL import Image
    assert Image.open(tmp_path / "samples" / "0000002.png").size == (8 * 32, 8 * 32)
    import sample  # sample.py takes the run directory and picks its newest checkpoint
    sample.main(["--ckpt", str(tmp_path), "--num-samples", "4", "--num-steps", "2",
                 "--out", str(tmp_path / "g.png")])
    assert Image.open(tmp_path / "g.png").size == (2 * 32, 2 * 32)


def test_train_ctrl_c_checkpoints_the_step_reached_and_names_the_resume_command(tmp_path):
    run, full = tmp_path / "run", tmp_path / "full"
    proc = subprocess.Popen(_train_cmd("--steps", "100000", "--out-dir", str(run)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_CPU)
    deadline = time.time() + 120
    while (not ((run / "log.jsonl").exists() and (run / "log.jsonl").stat().st_size)
           and time.time() < deadline):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and proc.returncode == 1
    line = err.strip().splitlines()[-1]
    assert (line.startswith("stopped at step ")
            and line.endswith(f"to go on: python train.py --resume {run}"))
    step = int(line.split()[3].rstrip(","))
    # --ckpt-every is 50,000: the Ctrl-C's own
    assert os.listdir(run / "checkpoints") == [f"{step:07d}.pt"]
    assert (run / "curves.png").exists() and json.load(open(run / "args.json"))["steps"] == 100000
    # the command it names goes on from there as if never stopped
    subprocess.run(_train_cmd("--resume", str(run), "--steps", str(step + 2)), check=True,
                   capture_output=True, env=_CPU)
    subprocess.run(_train_cmd("--steps", str(step + 2), "--out-dir", str(full)), check=True,
                   capture_output=True, env=_CPU)
    a, b = (_state(d / "checkpoints" / f"{step + 2:07d}.pt") for d in (full, run))
    for key in ("model", "ema", "ema2"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_train_paper_run_without_data_is_refused_and_the_demos_go(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/imagenet/train here
    for argv in (["--model", "SiT-B/2"], ["--encoder", "dinov2-vit-b", "--irepa"],
                 ["--objective", "meanflow", "--encoder", "dinov3-vit-b16", "--irepa"],
                 # a pretrained encoder: the paper's
                 ["--model", "JiT-demo/16", "--encoder", "dinov2-vit-s"]):
        with pytest.raises(SystemExit, match="no data for the paper's .*: pass --data-path .* "
                                             "the offline demo is: python train.py$"):
            train.main([*argv, "--steps", "1"])
    assert not os.listdir(tmp_path)  # refused before any work
    # first row: the README's; second row: shapes, asked for
    for argv in ([], ["--encoder", "dinov2-vit-s", "--encoder-weights", "random", "--irepa"],
                 ["--objective", "meanflow"], ["--model", "SiT-B/2", "--num-generated", "256"]):
        train.check_run(train.get_args(argv), 1)


def test_train_console_says_what_runs_in_a_few_lines_and_args_json_holds_every_setting(
        tmp_path, capsys, cpu_only):
    run = tmp_path / "run"
    irepa = ["--encoder", "dinov2-vit-s", "--encoder-weights", "random", "--irepa"]
    with pytest.warns(UserWarning, match="RANDOM"):
        train.main([*_TINY, *irepa, "--steps", "2", "--ckpt-every", "2", "--out-dir", str(run)])
    out = capsys.readouterr().out.splitlines()
    assert (out[0].startswith("model: JiT-demo/16 (flow), ")
            and out[0].endswith(" trainable parameters"))
    assert out[2] == ("method: iREPA to dinov2-vit-s after block 4: conv projector, coeff 0.5, "
                      "spatial norm gamma 0.8")
    assert out[3] == f"run: {run}, 2 steps of batch 8, 1 x cpu" and len(out) == 4
    saved = json.load(open(run / "args.json"))
    assert saved == json.loads(json.dumps(_state(run / "checkpoints" / "0000002.pt")["args"],
                                          default=str))
    with pytest.warns(UserWarning, match="RANDOM"):
        train.main(["--resume", str(run), "--steps", "4"])
    assert (f"resuming from {run / 'checkpoints' / '0000002.pt'} at step 2"
            in capsys.readouterr().out)
    assert json.load(open(run / "args.json"))["steps"] == 4


def test_train_curves_png_with_each_grid_and_meanflow_shows_its_error(tmp_path, monkeypatch, capsys,
                                                                      cpu_only):
    from PIL import Image
    drawn, real = [], train.save_curves
    # the grids' times, without their sampling
    monkeypatch.setattr(train, "sample_grid", lambda *a: None)
    monkeypatch.setattr(train, "save_curves", lambda log, path, keys: drawn.append(
        (len(open(log).readlines()), keys)) or real(log, path, keys))
    train.main([*_TINY, "--steps", "4", "--sample-every", "2", "--ckpt-every", "4",
                "--out-dir", str(tmp_path / "a")])
    # at each grid, the log so far
    assert drawn == [(1, ("loss", "denoise")), (2, ("loss", "denoise"))]
    assert Image.open(tmp_path / "a" / "curves.png").size == (640, 2 * 160)
    capsys.readouterr()
    drawn.clear()
    train.main([*_MF_TINY, "--steps", "2", "--ckpt-every", "2", "--out-dir", str(tmp_path / "mf")])
    # MeanFlow's unweighted error: its weighted loss stays near 1
    assert drawn == [(1, ("denoise",))]
    err = capsys.readouterr().err
    assert "error=" in err and "loss=" not in err


def test_train_wandb_logs_the_records_and_is_refused_without_the_package(tmp_path, monkeypatch):
    import importlib.machinery
    import types
    calls = []

    class Run:
        def log(self, rec, step):
            calls.append((step, rec))
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = tmp_path / "run"
    train.main([*_TINY, "--steps", "4", "--ckpt-every", "4", "--wandb", "proj",
                "--out-dir", str(run)])
    init, *logged = calls
    assert init["project"] == "proj" and init["config"]["steps"] == 4
    assert (logged == [(r["step"], r) for r in map(json.loads, open(run / "log.jsonl"))]
            and len(logged) == 2)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as when it is not installed
    with pytest.raises(SystemExit, match="^--wandb needs: pip install wandb$"):
        train.main([*_TINY, "--steps", "1", "--wandb", "proj", "--out-dir", str(tmp_path / "r2")])
    assert not (tmp_path / "r2").exists()


# The exact network for Gaussian data x ~ N(mu_y, SD^2) per pixel: the best denoiser is known in
# closed form, so each objective's minimum and each sampler's output are too (here and below).
_MU, _SD = 1.5, 0.5


class _ExactGaussian(nn.Module):
    """The true network for class means mus (the null class's last), on SiT's path (x_t = (1-t) x
    + t eps, velocity), JiT's (z = t x + (1-t) s eps, x-prediction) or MeanFlow's average
    velocity u(z_t, r, t) of the exact ODE's flow (h = t - r), all in float64."""

    def __init__(self, family, mus, sd=_SD, noise_scale=1.0):
        super().__init__()
        self.family, self.sd, self.s = family, sd, noise_scale
        self.register_buffer("mus", torch.tensor(mus, dtype=torch.float64))  # (classes + 1,)
        self.num_classes, self.input_size, self.in_channels = len(mus) - 1, 2, 1

    def sit_mean_std(self, t):  # of x_t on the SiT path
        return (1 - t), ((1 - t) ** 2 * self.sd ** 2 + t ** 2).sqrt()

    def forward(self, x, t, y, align_depth=None, h=None):
        mu = self.mus[y].view(-1, 1, 1, 1)
        x, t = x.double(), t.double().view(-1, 1, 1, 1)
        if self.family == "jit":  # E[x | z_t]
            var = t ** 2 * self.sd ** 2 + (1 - t) ** 2 * self.s ** 2
            return (mu + t * self.sd ** 2 / var * (x - t * mu)), None
        a, b = self.sit_mean_std(t)
        if h is None:  # E[eps - x | x_t]
            k = (t - (1 - t) * self.sd ** 2) / b ** 2
            return (-mu + k * (x - a * mu)), None
        r = t - h.double().view(-1, 1, 1, 1)  # the ODE maps standardised x_t to standardised x_r
        ar, br = self.sit_mean_std(r)
        x_r = ar * mu + br / b * (x - a * mu)
        return (x - x_r) / (t - r).clamp_min(1e-12), None


def _sit_minimum():  # E_t Var(eps - x | x_t), t ~ U(0, 1), for x_t = (1 - t) x + t eps
    from scipy import integrate

    def var(t):
        b2 = (1 - t) ** 2 * _SD ** 2 + t ** 2
        return 1 + _SD ** 2 - (t - (1 - t) * _SD ** 2) ** 2 / b2
    return integrate.quad(var, 0, 1)[0]


def _jit_minimum(s):  # E_t Var(x | z_t) / max(1 - t, 0.05)^2, t = sigmoid(N(-0.8, 0.8))
    from scipy import integrate, special, stats

    def term(n):
        t = special.expit(0.8 * n - 0.8)
        var = _SD ** 2 - t ** 2 * _SD ** 4 / (t ** 2 * _SD ** 2 + (1 - t) ** 2 * s ** 2)
        return stats.norm.pdf(n) * var / max(1 - t, 0.05) ** 2
    return integrate.quad(term, -10, 10, limit=200)[0]


@pytest.mark.parametrize("family,scale", [("SiT", 1.0), ("JiT", 1.0), ("JiT", 2.0)])
def test_train_the_exact_model_reaches_the_objectives_minimum(family, scale):
    torch.manual_seed(0)
    net = _ExactGaussian(family.lower(), [_MU, 0.0], noise_scale=scale)
    obj = train.Objective(net, None, family=family, align_depth=None, gamma=None, coeff=0.0,
                          noise_scale=scale)
    x = _MU + _SD * torch.randn(50_000, 1, 2, 2, dtype=torch.float64)
    loss, denoise, rep = obj(x, torch.zeros(len(x), dtype=torch.long), None)
    want = _sit_minimum() if family == "SiT" else _jit_minimum(scale)
    assert loss.item() == pytest.approx(want, rel=0.03) and rep == 0


def _built(tmp_path, *flags):
    args = train.get_args(["--out-dir", str(tmp_path / "run"), "--no-compile",
                           "--precision", "fp32", *flags])
    torch.manual_seed(0)
    return args, *train.build(args, torch.device("cpu"))


def test_train_step_updates_the_ema_by_its_formula_and_drops_labels_to_the_null_class(tmp_path):
    args, objective, encoder, vae, emas, opt = _built(
        tmp_path, "--ema", "0.9", "--image-size", "16", "--batch-size", "512",
        "--num-generated", "512", "--steps", "2")
    loader = train.load_data(args, vae, torch.device("cpu"), 0, 1, 0)
    net, ema, seen = objective.net, emas[0], []

    def forward(x, y, target):  # records the inputs; a cheap loss that moves every parameter
        seen.append((x, y))
        loss = sum((p ** 2).sum() for p in net.parameters() if p.requires_grad)
        return loss, loss, loss * 0
    objective.forward = forward
    step = train.make_step(args, objective, encoder, vae, emas, opt, torch.device("cpu"), 1)
    images, labels = [], []
    for x, y, lat in loader:
        before = [e.detach().clone() for e in ema.parameters()]
        step(x, y, lat)
        images.append(x)
        labels.append(y)
    for b, e, p in zip(before, ema.parameters(), net.parameters()):
        want = 0.9 * b + 0.1 * p.detach() if p.requires_grad else b  # frozen: not averaged
        assert torch.allclose(e, want, atol=1e-7)
    given, used = torch.cat(labels), torch.cat([y for _, y in seen])
    dropped = used != given
    assert (used[dropped] == args.num_classes).all()  # the null class, the embedder's last row
    assert 0.07 < dropped.float().mean() < 0.13  # 10% of 1024 labels
    pixels = torch.cat([x for x, _ in seen])  # JiT: uint8 0..255 -> [-1, 1]
    assert torch.allclose(pixels, torch.cat(images).float() / 255 * 2 - 1)


def test_train_builds_the_objective_with_gamma_and_coeff_where_the_flags_say(tmp_path):
    args, objective, *_ = _built(tmp_path, "--encoder", "dinov2-vit-s", "--encoder-weights",
                                 "random", "--irepa", "--spnorm-gamma", "0.3",
                                 "--proj-coeff", "2.5", "--encoder-depth", "2")
    assert (objective.gamma, objective.coeff, objective.align_depth) == (0.3, 2.5, 2)


def test_train_jit_noise_std_from_512_px_is_the_one_sampling_uses(tmp_path):
    # the JiT recipe's noise std 2 from 512 px, in training as in sample.py and the grids
    for size, std in ((256, 1.0), (512, 2.0)):
        args, objective, *_ = _built(tmp_path, "--image-size", str(size), "--num-generated", "8")
        assert objective.noise_scale == std == model.noise_std("jit", size)


def test_train_jit_loss_is_the_velocity_error_clamped_near_t_one(monkeypatch):
    # t = sigmoid(0.8 n - 0.8) for chosen n: 1 - t is 0.057 for n 4.5, under 0.05 for n 6 and 8
    torch.manual_seed(0)
    net = _randomize(_tiny_jit())
    obj = train.Objective(net, None, family="JiT", align_depth=None, gamma=None, coeff=0.0,
                          noise_scale=2.0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    n, randn = torch.tensor([-1.0, 4.5, 6.0, 8.0]), torch.randn  # the objective's draw of (B,)
    monkeypatch.setattr(torch, "randn", lambda *a, **k: n.clone() if a == (4,) else randn(*a, **k))
    torch.manual_seed(1)
    loss, denoise, _ = obj(x, y, None)
    torch.manual_seed(1)
    t = torch.sigmoid(0.8 * n - 0.8).view(-1, 1, 1, 1)
    z = t * x + (1 - t) * 2.0 * torch.randn_like(x)
    w = 1 / torch.maximum(1 - t, torch.tensor(0.05))  # v = (x - z) / max(1 - t, 0.05)
    want = (((x - net(z, t.flatten(), y)[0]) * w) ** 2).mean()
    assert torch.allclose(loss, want, rtol=1e-5) and torch.equal(loss, denoise)


def test_train_loss_is_denoise_plus_coeff_times_the_alignment_term():
    torch.manual_seed(0)
    net = _randomize(_tiny_sit())
    proj = align.make_projector(64, 8, conv=True)
    obj = train.Objective(net, proj, family="SiT", align_depth=2, gamma=0.3, coeff=2.5)
    x, y, z = torch.randn(3, 4, 4, 4), torch.tensor([1, 2, 3]), torch.randn(3, 4, 8)
    torch.manual_seed(1)
    loss, denoise, rep = obj(x, y, z)
    torch.manual_seed(1)  # the objective's draws: t, then eps
    t, eps = torch.rand(3), torch.randn_like(x)
    out, hidden = net((1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps, t, y, 2)
    zn = (z - 0.3 * z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-6)
    want = -F.cosine_similarity(proj(hidden), zn, dim=-1).mean()
    assert torch.allclose(rep, want, atol=1e-6)
    assert torch.allclose(denoise, ((out - (eps - x)) ** 2).mean(), atol=1e-6)
    assert torch.allclose(loss, denoise + 2.5 * rep)

# =============================================================================
# train.py --objective meanflow (MeanFlow, with its sampler in sample.py)

import sample  # noqa: E402

# the official JAX code's outputs
_MF_FIXTURE = os.path.join(_ROOT, "fixtures", "meanflow_fixture.npz")


class _MeanFlowFixtureNet(nn.Module):
    """The closed-form network the fixture ran through the official code
    (fixtures/make_meanflow_fixture.py):
    u = tanh(W x + a t + b h + emb[y]) * (1 + t) + x h, pixel by pixel; h = 0 when not given."""

    def __init__(self, f):
        super().__init__()
        self.num_classes = int(f["num_classes"])
        self.W, self.a, self.b, self.emb = (torch.from_numpy(f[k]) for k in ("W", "a", "bb", "emb"))

    def forward(self, x, t, y, align_depth=None, h=None):
        t4 = t.view(-1, 1, 1, 1).double()
        h4 = torch.zeros_like(t4) if h is None else h.view(-1, 1, 1, 1).double()
        pre = torch.einsum("bchw,dc->bdhw", x, self.W) + self.a.view(1, -1, 1, 1) * t4 \
            + self.b.view(1, -1, 1, 1) * h4 + self.emb[y].view(len(x), -1, 1, 1)
        u = torch.tanh(pre) * (1 + t4) + x * h4
        return u, u.flatten(2).transpose(1, 2)


def _mf_objective(net, **settings):  # MeanFlow's defaults (train.MeanFlow), some replaced
    return train.Objective(net, None, family="SiT", align_depth=1, gamma=None, coeff=0.0,
                           mean_flow=train.MeanFlow(**settings))


# official defaults; omega 2 in [0.3, 0.8] with p 0.5; none
@pytest.mark.parametrize("case", ["a", "b", "c"])
def test_meanflow_loss_and_target_match_the_official_jax_code(case):
    f = np.load(_MF_FIXTURE)
    c = lambda k: f[f"{case}_{k}"]
    obj = _mf_objective(_MeanFlowFixtureNet(f), omega=float(c("omega")), kappa=float(c("kappa")),
                        interval=(float(c("t_start")), float(c("t_end"))),
                        weight=(float(c("norm_p")), float(c("norm_eps"))))
    n = torch.from_numpy(np.stack([c("n_t"), c("n_r")]))
    t, r = obj.mean_flow_times(n)
    # what the official net got: t and h = t - r
    assert torch.allclose(t, torch.from_numpy(c("t")), rtol=1e-6)
    assert torch.allclose(t - r, torch.from_numpy(c("h")), rtol=1e-6, atol=1e-7)
    x, e, y = (torch.from_numpy(f[k]) for k in ("x", "e", "labels"))
    # the official drops the first labels; train.py's loop drops at random
    y = torch.from_numpy(c("y_inp"))
    loss, mse, _, target = obj.mean_flow_loss(x, y, t, r, e)
    want = torch.from_numpy(c("u_tgt"))
    assert (target - want).norm() / want.norm() < 1e-5
    # the official keeps the weight (err + c)^p: its per-sample error is weight^(1/p) - c
    p, eps = obj.mf.weight
    err = torch.from_numpy(c("adp_wt")) ** (1 / p) - eps
    assert torch.allclose(mse * x[0].numel(), err.mean(), rtol=1e-5)
    assert torch.allclose(loss.double(),
                          torch.tensor(float(c("loss")), dtype=torch.float64), rtol=1e-5)


def test_meanflow_guidance_covers_both_ends_of_its_interval():
    # guidance where low <= t <= high (--mf-interval): with r = t the target is the guided
    # velocity omega v + (1 - omega - kappa) v_null + kappa v_cond, elsewhere v
    f = np.load(_MF_FIXTURE)
    net = _MeanFlowFixtureNet(f)
    obj = _mf_objective(net, omega=2.0, kappa=0.5, interval=(0.25, 0.75))
    x, e, y = (torch.from_numpy(f[k])[:5] for k in ("x", "e", "labels"))
    t = torch.tensor([0.25, 0.75, 0.5, 0.125, 0.875], dtype=torch.float64)
    target = obj.mean_flow_loss(x, y, t, t, e)[3]
    tt = t.view(-1, 1, 1, 1)
    z, v = (1 - tt) * x + tt * e, e - x
    v_null, v_cond = net(z, t, torch.full_like(y, net.num_classes))[0], net(z, t, y)[0]
    guided = 2.0 * v - 1.5 * v_null + 0.5 * v_cond
    torch.testing.assert_close(target[:3], guided[:3], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(target[3:], v[3:])


def test_meanflow_sampler_matches_the_official_jax_code():
    f = np.load(_MF_FIXTURE)
    net, z, y = _MeanFlowFixtureNet(f), torch.from_numpy(f["z"]), torch.from_numpy(f["labels"])
    for steps, key in ((1, "one_step"), (2, "two_step")):
        want = torch.from_numpy(f[key])
        assert (sample.mean_flow_sampler(net, z, y, steps) - want).norm() / want.norm() < 1e-6


@pytest.mark.parametrize("steps", [1, 2])
def test_meanflow_sampler_of_the_exact_model_is_exact(steps):
    # the exact average velocity moves noise n onto _MU + _SD n in any number of steps
    noise = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    net = _ExactGaussian("sit", [_MU, 0.0])
    x = sample.mean_flow_sampler(net, noise, torch.zeros(4000, dtype=torch.long), steps)
    assert torch.allclose(x.double(), _MU + _SD * noise.double(), atol=1e-5)


def _mf_tiny_sit():
    torch.manual_seed(0)
    net = model.SiT(image_size=32, patch_size=2, hidden_size=64, depth=2, num_heads=4,
                    num_classes=3, mean_flow=True)
    # adaLN-Zero starts at output 0: random weights give the jvp something to follow
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(std=0.1) if p.requires_grad else None
    return net


def test_meanflow_jvp_equals_finite_differences():
    net = _mf_tiny_sit()
    obj = _mf_objective(net, omega=1.0, kappa=0.0)
    g = torch.Generator().manual_seed(3)
    x, e = torch.randn(4, 4, 4, 4, generator=g), torch.randn(4, 4, 4, 4, generator=g)
    t, r, y = (torch.tensor([0.9, 0.7, 0.5, 0.3]), torch.tensor([0.2, 0.1, 0.4, 0.0]),
               torch.tensor([0, 1, 2, 3]))
    _, _, _, target = obj.mean_flow_loss(x, y, t, r, e)  # target = v - (t - r) du/dt
    du_dt = ((e - x) - target) / (t - r).view(-1, 1, 1, 1)
    # du/dt along the path: z moves by v, t by 1, r stays
    tt, v, d = t.view(-1, 1, 1, 1), e - x, 1e-2
    u = lambda s: net((1 - tt) * x + tt * e + s * v, t + s, y, h=t + s - r)[0]
    with torch.no_grad():
        fd = (u(d) - u(-d)) / (2 * d)
    assert (du_dt - fd).norm() / fd.norm() < 2e-3


def test_meanflow_gradient_stops_at_the_target_and_the_weight():
    # MeanFlow's loss is sg-weighted ||u - sg(target)||^2: its gradient is that of a regression
    # on the target, as a constant, with the weight 1 / (err + c) a constant too
    net = _mf_tiny_sit()
    obj = _mf_objective(net, omega=1.0, kappa=0.0)
    g = torch.Generator().manual_seed(3)
    x, e = torch.randn(4, 4, 4, 4, generator=g), torch.randn(4, 4, 4, 4, generator=g)
    t, r = torch.tensor([0.9, 0.7, 0.5, 0.3]), torch.tensor([0.2, 0.1, 0.4, 0.0])
    y = torch.tensor([0, 1, 2, 0])
    loss, _, _, target = obj.mean_flow_loss(x, y, t, r, e)
    params = [p for p in net.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, allow_unused=True)
    tt = t.view(-1, 1, 1, 1)
    u = net((1 - tt) * x + tt * e, t, y, h=t - r)[0]
    err = ((u - target.detach()) ** 2).sum((1, 2, 3))
    want = torch.autograd.grad((err / (err.detach() + 1e-3)).mean(), params, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-5))


def test_meanflow_sit_keeps_the_ordinary_keys_and_h_zero_is_the_velocity():
    net, plain = _mf_tiny_sit(), model.SiT(image_size=32, patch_size=2, hidden_size=64, depth=2,
                                           num_heads=4, num_classes=3)
    extra = set(net.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("h_embedder.") for k in extra)
    # an ordinary SiT checkpoint's keys all line up
    assert not set(plain.state_dict()) - set(net.state_dict())
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([0.3, 0.8]), torch.tensor([0, 1])
    assert torch.equal(net(x, t, y)[0], net(x, t, y, h=torch.zeros(2))[0])
    assert not torch.equal(net(x, t, y)[0], net(x, t, y, h=torch.full((2,), 0.5))[0])


def test_meanflow_demo_learns_shapes_and_colours_in_one_step(tmp_path, cpu_only):
    # the offline demo's path at 16 px for 600 steps (~70 s): train.py writes the EMA's
    # 1-step samples into the run folder, one row per class; each sample's object (its
    # pixels farthest from its border's mean colour) must take its class's colour. The
    # same measure gives 0.875 on the data, 0.1 by chance, 0.19 after 400 steps.
    from PIL import Image
    train.main(["--objective", "meanflow", "--image-size", "16", "--steps", "600", "--lr", "2e-3",
                "--sample-every", "600", "--out-dir", str(tmp_path)])
    # 8 classes x 8 samples
    grid = np.asarray(Image.open(tmp_path / "samples" / "0000600.png")).astype(float)
    images = grid.reshape(8, 16, 8, 16, 3).transpose(0, 2, 1, 3, 4).reshape(64, 16, 16, 3)
    colours = np.array(data._COLOURS, float)
    hits = []
    for image, k in zip(images, np.arange(8).repeat(8)):
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).mean(0)
        far = np.linalg.norm(image - border, axis=-1)
        obj = image[far >= np.quantile(far, 0.75)].mean(0)
        hits.append(np.linalg.norm(colours - obj, axis=1).argmin() == k)
    assert np.mean(hits) >= 0.5


def _mf_compiled_step_matches_eager(device):
    # the training step as train.py runs it on a GPU: fast paths, bf16 autocast, torch.compile
    # around the objective, jvp included, as one graph; its loss and gradients must match the
    # eager fp32 step's (eager bf16 fails on CUDA inside the jvp: train.py refuses it)
    import kernels
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    net = kernels.enable(_mf_tiny_sit().to(device)) if device == "cuda" else _mf_tiny_sit()
    obj = _mf_objective(net)
    x, y = (torch.randn(8, 4, 4, 4, device=device),
            torch.tensor([0, 1, 2, 3, 0, 1, 2, 0], device=device))
    grads = []
    for step, bf16 in ((obj, False), (torch.compile(obj), True)):
        torch.manual_seed(0)  # fallback_random: compiled code draws the eager step's t, r and noise
        with torch.autocast(device, torch.bfloat16, enabled=bf16), \
                torch._inductor.config.patch(fallback_random=True):
            loss, mse, _ = step(x, y, None)
        obj.zero_grad()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
        assert torch.isfinite(loss) and torch.isfinite(mse)
    assert (grads[0] - grads[1]).norm() / grads[0].norm() < 2e-2  # bf16 against fp32 (CPU: 7e-3)
    # the jvp compiled with the rest, not around it
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.mark.skipif(tuple(map(int, torch.__version__.split(".")[:2])) < (2, 14),
                    reason="inductor's CPU lowering of this jvp fails before torch 2.14 "
                           "(seen on 2.11; GPUs are fine)")
def test_meanflow_compiled_bf16_step_matches_eager_on_cpu(cpu_only):
    _mf_compiled_step_matches_eager("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_meanflow_compiled_bf16_step_on_gpu_matches_eager():
    _mf_compiled_step_matches_eager("cuda")


_MF_TINY = ["--objective", "meanflow", "--batch-size", "8", "--num-generated", "64",
            "--log-every", "2", "--sample-every", "0", "--lr", "1e-3", "--warmup-steps", "2",
            "--no-compile"]


def test_meanflow_run_resumes_exactly_and_samples_in_one_step(tmp_path, capsys, cpu_only):
    train.main([*_MF_TINY, "--steps", "4", "--ckpt-every", "2",
                "--out-dir", str(tmp_path / "full")])
    train.main([*_MF_TINY, "--steps", "2", "--ckpt-every", "2",
                "--out-dir", str(tmp_path / "half")])
    train.main(["--resume", str(tmp_path / "half"), "--steps", "4"])
    a, b = (_state(tmp_path / d / "checkpoints" / "0000004.pt") for d in ("full", "half"))
    assert a["args"]["model"] == "SiT-demo/4" and "h_embedder.mlp.0.weight" in a["model"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    with pytest.raises(SystemExit):  # the objective is the run's, like its model
        train.main(["--resume", str(tmp_path / "half"), "--objective", "flow", "--steps", "6"])
    assert "--objective flow differs from the run's meanflow" in capsys.readouterr().err
    sample.main(["--ckpt", str(tmp_path / "full"), "--num-samples", "4",
                 "--out", str(tmp_path / "s.npz")])
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (4, 32, 32, 3)
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(tmp_path / "full"), "--cfg-scale", "2",
                     "--out", str(tmp_path / "g.png")])
    assert "--mode meanflow does not fit this checkpoint: use --mode sde or ode or heun, or " \
        "--cfg-scale 1" in capsys.readouterr().err  # its guidance was learnt in training


def test_meanflow_with_irepa_trains_the_projector_on_sit_latents(tmp_path, cpu_only):
    # the paper's MeanFlow rows:
    # SiT on SD-VAE latents with an iREPA target (random VAE and encoder: offline)
    train.main(["--objective", "meanflow", "--model", "SiT-S/2", "--image-size", "32",
                "--vae-weights", "random", "--encoder", "dinov2-vit-s",
                "--encoder-weights", "random", "--irepa", "--batch-size", "4",
                "--num-generated", "8", "--steps", "2", "--log-every", "1", "--ckpt-every", "1",
                "--sample-every", "0", "--no-compile", "--out-dir", str(tmp_path)])
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    one, two = (_state(tmp_path / "checkpoints" / f"000000{s}.pt") for s in (1, 2))
    # negative cosine similarity
    assert all(r["repa"] < 0 for r in log) and two["args"]["proj"] == "conv"
    assert any(k.startswith("h_embedder.") for k in two["model"])
    # the loss trains the projector
    assert all(not torch.equal(v, one["proj"][k]) for k, v in two["proj"].items())


def test_meanflow_bad_input_is_refused_before_training(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="--objective meanflow trains SiT, not JiT-B/16"):
        train.main(["--objective", "meanflow", "--model", "JiT-B/16", "--out-dir", str(tmp_path)])
    assert not os.listdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # refused before any GPU work
    check = lambda *argv: train.check_run(train.get_args(["--objective", "meanflow", *argv,
                                                          "--out-dir", str(tmp_path)]), 1)
    with pytest.raises(SystemExit, match="keep --compile or pass --precision fp32"):
        check("--no-compile")
    check("--no-compile", "--precision", "fp32")
    assert train.get_args(["--objective", "meanflow", "--no-compile",
                           "--precision", "fp32"]).compile is False


# =============================================================================
# bench.py

import bench  # noqa: E402


def test_bench_train_prints_speed_and_leaves_no_log(tmp_path, capsys, monkeypatch, cpu_only):
    monkeypatch.chdir(tmp_path)  # a run would write out/... here
    bench.main(["train", *_TINY, "--bench-steps", "1", "--profile", "--encoder", "dinov2-vit-s"])
    out = capsys.readouterr().out
    assert "BENCH JiT-demo/16 enc=dinov2-vit-s proj=conv batch=8 world=1" in out
    assert "img/s per GPU, MFU nan%, peak memory nan GiB" in out and "Self CPU time total" in out
    assert not os.listdir(tmp_path)  # no log, checkpoint or sample grid


def test_bench_train_times_the_repae_step(tmp_path, capsys, monkeypatch, cpu_only):
    _repae_tiny(monkeypatch)
    monkeypatch.chdir(tmp_path)
    bench.main(["train", *_REPAE, "--bench-steps", "1"])
    assert "BENCH SiT-S/2 enc=dinov2-vit-s proj=conv batch=8" in capsys.readouterr().out
    assert not os.listdir(tmp_path)


def test_bench_sample_compares_fp32_and_bf16(capsys, cpu_only):
    bench.main(["sample", "--model", "JiT-demo/16", "--batch-size", "2", "--num-steps", "2"])
    out = capsys.readouterr().out
    assert "BENCH sample JiT-demo/16 heun-2 batch 2 fp32:" in out and " bf16: " in out
    rel = float(out.split("relative L2 of the samples: ")[1].split()[0])
    assert 0 < rel < 0.1  # bf16 changes the samples a little, not entirely


# =============================================================================
# encoders.py

import warnings  # noqa: E402
import encoders  # noqa: E402


_ENCODERS_REPO = os.path.dirname(os.path.abspath(encoders.__file__))

# Independent expectations, read off the official iREPA code and the model cards: token width D
# and the number of prefix tokens (CLS + registers / storage tokens) the official code drops.
_ENCODERS_EXPECTED = {  # name: (D, prefix tokens)
    "dinov2-vit-s": (384, 1), "dinov2-vit-b": (768, 1), "dinov2-vit-l": (1024, 1),
    "dinov2-vit-g": (1536, 1), "dinov2reg-vit-s": (384, 5), "dinov2reg-vit-b": (768, 5),
    "dinov2reg-vit-l": (1024, 5), "dinov2reg-vit-g": (1536, 5), "dinov3-vit-s16": (384, 5),
    "dinov3-vit-s16plus": (384, 5), "dinov3-vit-b16": (768, 5), "dinov3-vit-l16": (1024, 5),
    "dinov3-vit-h16plus": (1280, 5), "dinov3-vit-7b16": (4096, 5), "dino-vit-s": (384, 1),
    "dino-vit-b": (768, 1), "clip-vit-L": (1024, 1), "mae-vit-l": (1024, 1),
    "jepa-vit-h": (1280, 0), "mocov3-vit-b": (768, 1), "mocov3-vit-l": (1024, 1),
    "webssl-vit-dino300m_full2b_224": (1024, 1), "webssl-vit-dino1b_full2b_224": (1536, 1),
    "webssl-vit-dino2b_full2b_224": (2688, 1), "webssl-vit-dino3b_full2b_224": (3072, 1),
    "webssl-vit-dino5b_full2b_224": (3584, 1), "webssl-vit-dino7b_full8b_224": (4096, 1),
    "siglip-vit-b": (768, 0), "siglip-vit-l": (1024, 0), "siglip-vit-so400m": (1152, 0),
    "siglip2-vit-b": (768, 0), "siglip2-vit-l": (1024, 0), "siglip2-vit-so400m": (1152, 0),
    "siglip2-vit-g": (1536, 0), "pe-vit-t": (192, 1), "pe-vit-s": (384, 1), "pe-vit-b": (768, 1),
    "pe-vit-l": (1024, 1), "pe-vit-g": (1536, 0), "spatialpe-vit-b": (768, 1),
    "spatialpe-vit-l": (1024, 1), "spatialpe-vit-g": (1536, 0), "langpe-vit-l": (1024, 1),
    "langpe-vit-g": (1536, 0), "sam2-vit-s": (768, 0), "sam2-vit-b": (896, 0),
    "sam2-vit-l": (1152, 0), "cradio-vit-b": (768, 8), "cradio-vit-l": (1024, 8),
    "cradio-vit-h": (1280, 8), "cradio-vit-g": (1536, 8),
}
# the official code reads tokens before the final LayerNorm (CLIP: no ln_post;
# MAE: forward_features without norm; PE: forward_features(norm=False));
# C-RADIO and SAM2's Hiera have no final norm; all others apply it
_ENCODERS_PRENORM = ("clip-", "mae-", "pe-", "spatialpe-", "langpe-")
_ENCODERS_NO_NORM = ("cradio-", "sam2-")


def _encoders_build_meta(name, resolution):
    """Random-init encoder on the meta device: shapes only, no memory, no compute."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        try:
            return encoders.load_encoder(name, resolution, weights="random")
        except RuntimeError as err:
            if "Unknown model" in str(err):  # an older timm
                pytest.skip(str(err))
            raise


def _encoders_random(name, resolution):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return encoders.load_encoder(name, resolution, weights="random")


def test_encoders_registry_has_the_official_names():
    wanted = ([f"dinov2{r}-vit-{s}" for r in ("", "reg") for s in "sblg"]
              + [f"dinov3-vit-{s}" for s in ("s16", "s16plus", "b16", "l16", "h16plus", "7b16")]
              + ["dino-vit-s", "dino-vit-b", "clip-vit-L", "mae-vit-l", "jepa-vit-h",
                 "mocov3-vit-b", "mocov3-vit-l"]
              + [f"siglip-vit-{s}" for s in ("b", "l", "so400m")]
              + [f"siglip2-vit-{s}" for s in ("b", "l", "so400m", "g")]
              + [f"pe-vit-{s}" for s in "tsblg"] + [f"spatialpe-vit-{s}" for s in "blg"]
              + ["langpe-vit-l", "langpe-vit-g"] + [f"sam2-vit-{s}" for s in "sbl"]
              + [f"cradio-vit-{s}" for s in "blhg"]
              + [f"webssl-vit-{s}" for s in ("dino300m_full2b_224", "dino1b_full2b_224",
                                             "dino2b_full2b_224", "dino3b_full2b_224",
                                             "dino5b_full2b_224", "dino7b_full8b_224")])
    assert sorted(wanted) == sorted(encoders.ENCODERS) == sorted(_ENCODERS_EXPECTED)


def test_encoders_mismatched_torchvision_gets_a_clear_error(tmp_path):
    # the CPU-torch + CUDA-torchvision failure, simulated by a torchvision
    # that fails to import as that pair does; the import fails loudly with the
    # operator's name, which the README's troubleshooting section explains
    (tmp_path / "torchvision").mkdir()
    (tmp_path / "torchvision" / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n")
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(tmp_path),
                                           os.path.dirname(os.path.abspath(__file__))]))
    r = subprocess.run([sys.executable, "-c", "import encoders"], env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "torchvision::nms" in r.stderr


def test_encoders_unknown_name_is_refused():
    # the scripts list the valid names (train.py, metrics.py);
    # the loader's KeyError names the unknown one
    with pytest.raises(KeyError, match="dinov2-vit-x"):
        encoders.load_encoder("dinov2-vit-x")


@pytest.mark.parametrize("name", list(encoders.ENCODERS))
def test_encoders_every_encoder_builds_with_right_tokens_and_norm(name):
    # Cheap check for all, giants included: full-depth model built on the meta
    # device, its forward cut to the first block (blocks keep the shape; the real
    # forward of a representative subset is tested below). Hiera stays whole.
    enc = _encoders_build_meta(name, 256)
    dim, prefix = _ENCODERS_EXPECTED[name]
    assert (enc.embed_dim, enc.num_prefix) == (dim, prefix)
    norm = getattr(enc.model, "norm", torch.nn.Identity())
    assert (isinstance(norm, torch.nn.Identity)
            == name.startswith(_ENCODERS_PRENORM + _ENCODERS_NO_NORM)), norm
    assert all(not p.requires_grad for p in enc.parameters()) and not enc.training
    if not name.startswith("sam2"):
        enc.model.blocks = enc.model.blocks[:1]
    with torch.device("meta"):
        out = enc(torch.empty(2, 3, 256, 256, dtype=torch.uint8))
    assert tuple(out.shape) == (2, 256, dim) and out.dtype == torch.float32


@pytest.mark.parametrize("name", ["dinov2reg-vit-b", "dinov3-vit-b16", "siglip-vit-so400m",
                                  "pe-vit-l", "sam2-vit-s", "cradio-vit-b",
                                  "mocov3-vit-b", "jepa-vit-h"])
def test_encoders_512px_gives_32x32_tokens(name):
    enc = _encoders_build_meta(name, 512)
    if not name.startswith("sam2"):
        enc.model.blocks = enc.model.blocks[:1]
    with torch.device("meta"):
        out = enc(torch.empty(2, 3, 512, 512, dtype=torch.uint8))
    assert tuple(out.shape) == (2, 1024, _ENCODERS_EXPECTED[name][0])


def test_encoders_real_forward_small_models():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    for name in ("dinov2-vit-s", "dinov3-vit-s16", "pe-vit-t", "sam2-vit-s"):
        enc = _encoders_random(name, 32)
        out = enc(x)
        assert (out.shape == (2, 4, _ENCODERS_EXPECTED[name][0]) and torch.isfinite(out).all()
                and not out.requires_grad)
        # timm inits LayerNorm to weight 1, bias 0:
        # normed tokens have zero mean and unit variance over channels
        normed = torch.allclose(out.mean(-1), torch.zeros(2, 4), atol=1e-4) and torch.allclose(
            out.var(-1, unbiased=False), torch.ones(2, 4), atol=1e-2)
        # PE: before the norm; Hiera: none
        assert normed == (name in ("dinov2-vit-s", "dinov3-vit-s16")), name
    with pytest.raises(ValueError, match="uint8"):
        enc(x.float())


def _encoders_official_preprocess(name, x, R):
    """The official iREPA recipe per encoder family (ldm/vision_encoder.py),
    written out independently."""
    from torchvision.transforms import Normalize, Resize
    imagenet = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    clip = Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    x = x / 255.
    family = name.split("-")[0]
    if family in ("dinov2", "dinov2reg", "jepa", "webssl"):
        return F.interpolate(imagenet(x), 224 * (R // 256), mode="bicubic")
    if family == "dino":
        return F.interpolate(imagenet(x), R, mode="bicubic")
    if family == "dinov3":
        return imagenet(Resize((R, R), antialias=True)(x))
    if family == "siglip":
        return F.interpolate(imagenet(x), (14 if name.endswith("so400m") else 16) * (R // 16),
                             mode="bicubic")
    if family == "siglip2":
        return F.interpolate(imagenet(x), R, mode="bicubic")
    if family == "clip":
        return clip(F.interpolate(x, 224 * (x.shape[-1] // 256), mode="bicubic"))
    if family in ("mocov3", "mae"):
        return imagenet(x)
    if family in ("pe", "spatialpe", "langpe"):
        patch = 16 if name[-1] in "tsb" else 14
        return Normalize([0.5] * 3, [0.5] * 3)(F.interpolate(x, patch * (R // 16), mode="bilinear"))
    if family == "sam2":
        return imagenet(F.interpolate(x, R * 2, mode="bicubic"))
    if family == "cradio":  # RADIO's own input conditioner normalises with the CLIP statistics
        return clip(F.interpolate(x, 16 * (R // 16), mode="bilinear", align_corners=False))
    raise KeyError(name)


def test_encoders_preprocessing_matches_official_recipe_bit_exactly():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    dummy = torch.nn.Module()
    dummy.num_features = 1
    for name, spec in encoders.ENCODERS.items():
        ours = encoders.Encoder(dummy, spec, 256).preprocess(x)
        assert torch.equal(ours, _encoders_official_preprocess(name, x, 256)), name
    # the check is sharp enough to see the order:
    # normalising after the 224 resize differs in the last bits
    ref = _encoders_official_preprocess("dinov2-vit-b", x, 256)
    swapped = (F.interpolate(x / 255., 224, mode="bicubic")
               - torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)) \
        / torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    assert torch.allclose(swapped, ref, atol=1e-5) and not torch.equal(swapped, ref)


def test_encoders_missing_weights_fail_fast_naming_the_flags(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    # a real connection attempt that cannot succeed
    monkeypatch.setattr(hf, "ENDPOINT", "https://hub.invalid")
    for load in (lambda: encoders.load_encoder("dinov2-vit-b"), lambda: encoders.load_vae()):
        t = time.time()
        with pytest.raises(RuntimeError) as err:
            load()
        assert time.time() - t < 10
        assert "PATH" in str(err.value) and "random" in str(err.value)
    with pytest.raises(RuntimeError,
                       match="encoder dinov2-vit-b: weights timm/vit_base_patch14_dinov2.lvd142m/"
                             "model.safetensors .*`--encoder-weights PATH`"
                             ".*`--encoder-weights random`"):
        encoders.load_encoder("dinov2-vit-b")
    with pytest.raises(RuntimeError, match="sd-vae-ft-mse.*`--vae-weights PATH`"):
        encoders.load_vae()
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        encoders.load_encoder("siglip-vit-b")
    with pytest.raises(RuntimeError, match="--encoder-weights PATH"):  # no hub weights at all
        encoders.load_encoder("mocov3-vit-b")
    with pytest.raises(ValueError, match="--encoder-weights .*nope.pth: no such file"):
        encoders.load_encoder("dino-vit-s", weights=str(tmp_path / "nope.pth"))
    with pytest.warns(UserWarning, match="RANDOM"), torch.device("meta"):
        encoders.load_encoder("dino-vit-s", weights="random")


def test_encoders_mocov3_checkpoint_rename(monkeypatch, tmp_path):
    import timm
    # a tiny ViT with blocks 13 and 14, misnamed in the official file
    kw = dict(embed_dim=32, depth=15, num_heads=2)
    monkeypatch.setitem(encoders.ENCODERS, "mocov3-vit-b",
                        dict(encoders.ENCODERS["mocov3-vit-b"], kw=kw))
    # 224 px: 14x14 table
    src = timm.create_model("vit_base_patch16_224", num_classes=0, **kw).state_dict()
    sd = {"module.base_encoder." + k: v for k, v in src.items()}
    for a, b in (("13.norm1", "13.norm13"), ("13.mlp.fc1", "13.mlp.fc13"),
                 ("14.norm2", "14.norm14"), ("14.mlp.fc2", "14.mlp.fc14")):
        for t in ("weight", "bias"):
            sd[f"module.base_encoder.blocks.{b}.{t}"] = sd.pop(
                f"module.base_encoder.blocks.{a}.{t}")
    # projection head and momentum encoder: dropped
    sd["module.base_encoder.head.0.weight"] = torch.zeros(4, 32)
    sd["module.momentum_encoder.cls_token"] = torch.zeros(1, 1, 32)
    torch.save({"state_dict": sd, "epoch": 300}, tmp_path / "vit-b-300ep.pth.tar")
    enc = encoders.load_encoder("mocov3-vit-b", 32, weights=str(tmp_path / "vit-b-300ep.pth.tar"))
    assert torch.equal(enc.model.blocks[13].norm1.weight, src["blocks.13.norm1.weight"])
    assert torch.equal(enc.model.blocks[14].mlp.fc2.weight, src["blocks.14.mlp.fc2.weight"])
    cls, grid = (src["pos_embed"][:, :1],
                 src["pos_embed"][:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2))
    # official: 14 -> 16 at load, then 16 -> the run's grid, both with timm
    grid = F.interpolate(F.interpolate(grid, (16, 16), mode="bicubic", antialias=True), (2, 2),
                         mode="bicubic", antialias=True)
    assert torch.allclose(enc.model.pos_embed,
                          torch.cat([cls, grid.flatten(2).transpose(1, 2)], 1), atol=1e-6)
    assert enc(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 4, 32)


def test_encoders_webssl_transformers_checkpoint_rename(monkeypatch, tmp_path):
    from safetensors.torch import save_file
    name, D, depth = "webssl-vit-dino1b_full2b_224", 32, 2
    hidden = (int(D * 4 * 2 / 3) + 7) // 8 * 8  # DINOv2 SwiGLU width (88 here)
    monkeypatch.setitem(encoders.ENCODERS, name, dict(encoders.ENCODERS[name], kw=dict(
        encoders.ENCODERS[name]["kw"], embed_dim=D, depth=depth, num_heads=2,
        mlp_ratio=(2 * hidden + 0.5) / D)))
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"embeddings.cls_token": r(1, 1, D), "embeddings.mask_token": r(1, D),
          "embeddings.position_embeddings": r(1, 1 + 16 * 16, D),
          "embeddings.patch_embeddings.projection.weight": r(D, 3, 14, 14),
          "embeddings.patch_embeddings.projection.bias": r(D), "layernorm.weight": r(D),
          "layernorm.bias": r(D)}
    for i in range(depth):
        p = f"encoder.layer.{i}."
        for m, shape in (("norm1", (D,)), ("norm2", (D,)), ("attention.attention.query", (D, D)),
                         ("attention.attention.key", (D, D)), ("attention.attention.value", (D, D)),
                         ("attention.output.dense", (D, D)), ("mlp.weights_in", (2 * hidden, D)),
                         ("mlp.weights_out", (D, hidden))):
            sd[p + m + ".weight"], sd[p + m + ".bias"] = r(*shape), r(shape[0])
        sd[p + "layer_scale1.lambda1"], sd[p + "layer_scale2.lambda1"] = r(D), r(D)
    save_file(sd, str(tmp_path / "model.safetensors"))
    # strict load inside
    enc = encoders.load_encoder(name, 32, weights=str(tmp_path / "model.safetensors"))
    b = enc.model.blocks[1]
    assert torch.equal(b.attn.qkv.weight,
                       torch.cat([sd[f"encoder.layer.1.attention.attention.{t}.weight"]
                                  for t in ("query", "key", "value")]))
    assert torch.equal(b.ls2.gamma, sd["encoder.layer.1.layer_scale2.lambda1"])
    assert torch.equal(b.mlp.fc1.weight, sd["encoder.layer.1.mlp.weights_in.weight"])
    assert (torch.equal(enc.model.norm.weight, sd["layernorm.weight"])
            and enc.model.pos_embed.shape == (1, 5, D))
    assert enc(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 4, D)


def _encoders_fixture():
    f = torch.load(os.path.join(_ENCODERS_REPO, "fixtures", "vae_fixture.pt"), weights_only=True)
    return f, {k: v.float() for k, v in f["state_dict"].items()}


def _encoders_rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_encoders_vae_matches_diffusers_fixture():
    f, sd = _encoders_fixture()
    vae = encoders.VAE(**f["config"]).load_diffusers(sd).eval()
    mean, std = vae.encode(f["x"].float())
    assert (mean.shape == (2, 4, 4, 4) and _encoders_rel(mean, f["mean"]) <= 1e-5
            and _encoders_rel(std, f["std"]) <= 1e-5)
    assert _encoders_rel(vae.decode(f["z"].float()), f["decoded"]) <= 1e-5
    renamed = {}  # pre-2023 diffusers files name the attention weights query/key/value/proj_attn
    for k, v in sd.items():
        for a, b in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                     (".to_out.0.", ".proj_attn.")):
            k = k.replace(a, b)
        renamed[k] = v
    assert len(renamed) == len(sd) and "decoder.mid_block.attentions.0.proj_attn.weight" in renamed
    assert _encoders_rel(encoders.VAE(**f["config"]).load_diffusers(renamed).decode(f["z"].float()),
                         f["decoded"]) <= 1e-5
    decoder_only = encoders.VAE(**f["config"]).load_diffusers(
        {k: v for k, v in sd.items() if not k.startswith(("encoder.", "quant_conv."))})
    assert _encoders_rel(decoder_only.decode(f["z"].float()), f["decoded"]) <= 1e-5
    with pytest.raises(TypeError):  # a decoder-only VAE has no encoder
        decoder_only.encode(f["x"].float())
    with pytest.raises(RuntimeError, match="Missing key"):
        encoders.VAE(**f["config"]).load_diffusers({k: v for k, v in sd.items()
                                                    if "mid_block" not in k})


def test_encoders_vae_loads_the_official_ldm_layout():
    # the official iREPA / REPA-E VAE files (CompVis/LDM names, attention as 1x1 convs): a narrow
    # VAE of the official autoencoder.py (fixtures/make_ldm_vae_fixture.py) gives its outputs, and
    # the full-size VAE_F8D4's names and shapes all land on ours
    f = torch.load(os.path.join(_ENCODERS_REPO, "fixtures", "ldm_vae_fixture.pt"),
                   weights_only=True)
    sd = {k: v.float() for k, v in f["state_dict"].items()}
    assert "decoder.up.3.upsample.conv.weight" in sd and sd["encoder.mid.attn_1.q.weight"].ndim == 4
    small = encoders.VAE(widths=(32,) * 4, layers=1).load_diffusers(sd).eval()  # load_vae's load
    mean, std = small.encode(f["x"].float())
    assert _encoders_rel(mean, f["mean"]) <= 1e-5 and _encoders_rel(std, f["std"]) <= 1e-5
    assert _encoders_rel(small.decode(f["z"].float()), f["decoded"]) <= 1e-5
    with torch.device("meta"):
        full = encoders.VAE()
    official = {k: torch.empty(s, device="meta") for k, s in f["full_size_shapes"].items()}
    converted = encoders.ldm_to_diffusers(official)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in
                                                          full.state_dict().items()}


def test_encoders_vae_full_size_layout_and_parameter_count():
    f, _ = _encoders_fixture()
    with torch.device("meta"):
        vae = encoders.VAE()
    # diffusers' own list
    assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == f["full_size_shapes"]
    assert sum(torch.Size(s).numel() for s in f["full_size_shapes"].values()) == 83_653_863
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863


def test_encoders_load_vae_file_and_latent_scaling(monkeypatch, tmp_path):
    from safetensors.torch import save_file
    f, sd = _encoders_fixture()
    small = encoders.VAE
    # load_vae builds the small fixture model
    monkeypatch.setattr(encoders, "VAE", lambda: small(**f["config"]))
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    vae = encoders.load_vae(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    assert _encoders_rel(vae.decode(f["z"].float()), f["decoded"]) <= 1e-5
    z = torch.randn(2, 4, 4, 4)
    assert (torch.allclose(vae.scale(z), z * 0.18215)
            and torch.allclose(vae.unscale(vae.scale(z)), z, atol=1e-6))
    scale, bias = torch.tensor([0.5, 1.0, 2.0, 4.0]), torch.tensor([0.1, -0.2, 0.3, 0.0])
    # official stats file layout
    torch.save({"latents_scale": scale, "latents_bias": bias}, tmp_path / "stats.pt")
    with pytest.warns(UserWarning, match="RANDOM"):
        vae = encoders.load_vae("random", stats=str(tmp_path / "stats.pt"))
    # official: (z - latents_bias) * latents_scale
    want = (z - bias.view(1, 4, 1, 1)) * scale.view(1, 4, 1, 1)
    assert torch.allclose(vae.scale(z), want) and torch.allclose(vae.unscale(want), z, atol=1e-6)


def test_encoders_pretrained_file_and_hub_cache_load_like_official_pe(monkeypatch, tmp_path):
    # PE-Core-T checkpoint at its native 384 px (24x24 table) in timm's hub layout,
    # read from a local HF cache
    import huggingface_hub.constants as hf
    import timm
    from safetensors.torch import save_file
    src = timm.create_model("vit_pe_core_tiny_patch16_384", num_classes=0).state_dict()
    snapshot = tmp_path / "models--timm--vit_pe_core_tiny_patch16_384.fb" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file(src, str(snapshot / "model.safetensors"))
    (tmp_path / "models--timm--vit_pe_core_tiny_patch16_384.fb" / "refs").mkdir()
    (tmp_path / "models--timm--vit_pe_core_tiny_patch16_384.fb" / "refs" / "main").write_text(
        "0123abcd")
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf, "ENDPOINT", "https://hub.invalid")  # must not be needed
    cls, grid = (src["pos_embed"][:, :1],
                 src["pos_embed"][:, 1:].reshape(1, 24, 24, -1).permute(0, 3, 1, 2))
    # official PE: on the fly, no antialias
    grid = F.interpolate(grid, (2, 2), mode="bilinear", align_corners=False)
    for weights in (None, str(snapshot / "model.safetensors")):
        enc = encoders.load_encoder("pe-vit-t", 32, weights=weights)
        assert torch.equal(enc.model.blocks[3].attn.qkv.weight, src["blocks.3.attn.qkv.weight"])
        assert torch.allclose(enc.model.pos_embed,
                              torch.cat([cls, grid.flatten(2).transpose(1, 2)], 1), atol=1e-6)
        assert enc(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 4, 192)

# =============================================================================
# kernels.py: every GPU fast path against its plain definition

import copy  # noqa: E402
import kernels  # noqa: E402


@pytest.mark.parametrize("C, D, p, side", [(4, 64, 2, 8), (3, 32, 16, 32), (3, 48, 14, 28),
                                           (3, 16, (2, 4), 8), (3, 8, 4, 10)])
def test_kernels_patch_conv_equals_the_conv(C, D, p, side):
    torch.manual_seed(0)
    conv, x = torch.nn.Conv2d(C, D, p, stride=p), torch.randn(2, C, side, side)
    ref = conv(x)
    kernels.enable(conv)
    out = conv(x)
    # token-major memory
    assert type(conv) is kernels.PatchConv and out.permute(0, 2, 3, 1).is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_kernels_token_stream_is_token_major_and_keys_stay():
    # a channel-major (B, T, D) view would be carried by torch.compile
    # through every residual add and make each LayerNorm read strided rows
    # (SiT-B/2 trained 3% slower compiled, 13% slower eager that way)
    for net, x in ((_tiny_sit(), torch.randn(2, 4, 8, 8)),
                   (_tiny_jit(), torch.randn(2, 3, 32, 32))):
        ref, keys = net.x_embedder(x), list(net.state_dict())
        kernels.enable(net)
        assert net.x_embedder(x).is_contiguous() and list(net.state_dict()) == keys
        torch.testing.assert_close(net.x_embedder(x), ref, rtol=1e-5, atol=1e-5)


def test_kernels_encoder_patch_embedding_is_a_matrix_product_with_the_convs_values():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    for name in ("dinov2-vit-s", "pe-vit-t", "sam2-vit-s"):
        enc = _encoders_random(name, 32)
        ref = enc(x)  # timm's own conv
        kernels.enable(enc)
        # Hiera overlaps
        assert isinstance(enc.model.patch_embed.proj, kernels.PatchConv) == (name != "sam2-vit-s")
        torch.testing.assert_close(enc(x), ref, rtol=1e-5, atol=1e-5)


def test_kernels_mlp_gelu_is_swapped_with_the_same_values_off_the_gpu():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    enc = _encoders_random("mae-vit-l", 32)  # no layer scale: the MLPs move the output
    enc.model.patch_embed.proj.__class__ = kernels.PatchConv  # the other fast path, on in both
    ref = enc(x)  # timm's own fc1 and GELU
    kernels.enable(enc)
    mlps = [m for m in enc.modules() if isinstance(m, kernels.Mlp)]
    assert len(mlps) == 24 and all(type(m.fc1) is kernels.LinearGELU for m in mlps)
    assert torch.equal(enc(x), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_kernels_gelu_epilogue_on_gpu_is_as_close_to_fp32_as_bf16_autocast():
    torch.manual_seed(0)
    fc1 = nn.Linear(768, 3072).cuda()
    x = torch.randn(4, 257, 768, device="cuda")
    ref = F.gelu(fc1(x))                                 # exact GELU in fp32
    fused = copy.deepcopy(fc1)
    fused.__class__ = kernels.LinearGELU                 # as enable() does
    with torch.autocast("cuda", torch.bfloat16):
        out, plain = fused(x), F.gelu(fc1(x))
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    err = lambda a: ((a.float() - ref).norm() / ref.norm()).item()
    # equal if the epilogue were not used
    assert err(out) < err(plain) and err(out) < 4e-3, (err(out), err(plain))
    torch.testing.assert_close(fused(x), ref)          # fp32: the two ops


_QK_KERNEL_CHECK = """
import torch, kernels, model
torch.manual_seed(0)
for hd in (16, 20):                                    # 20: not a power of two (JiT-H has 80)
    cos, sin = model.rope_tables(hd, 4, prefix=2)      # 18 tokens
    w0, g = torch.randn(hd) * 0.2 + 1, torch.randn(3, 18, 4, hd)
    qkv0 = torch.randn(3, 18, 3, 4, hd)                # q: a strided view, as in JiTAttention
    res = []
    for kernel in (False, True):
        qkv, w = qkv0.clone().requires_grad_(), w0.clone().requires_grad_()
        q = qkv[:, :, 0]                               # 216 rows: the last program is partly masked
        out = kernels.qk_norm_rope(q, w, cos, sin, 1e-6) if kernel else model.apply_rope(
            w * torch.nn.functional.rms_norm(q, (hd,), eps=1e-6), cos, sin)
        (out * g).sum().backward()
        res.append([out.detach(), qkv.grad, w.grad])
    errs = [((a - b).norm() / b.norm()).item() for a, b in zip(res[1], res[0])]
    assert max(errs) < 1e-6 and res[1][1][:, :, 1:].abs().max() == 0, (hd, errs)
print("ok")
"""


def test_kernels_qk_norm_rope_matches_pytorch_in_the_triton_interpreter():
    # the GPU kernels of JiT's q/k norm + RoPE, run on the CPU by Triton's interpreter,
    # in fp32: the same output and gradients (input and weight) as the PyTorch definition
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _QK_KERNEL_CHECK],
                       cwd=os.path.dirname(model.__file__), env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr[-3000:]


def test_kernels_enable_swaps_jit_attention_and_keeps_cpu_results():
    pytest.importorskip("triton")
    torch.manual_seed(0)
    plain = _randomize(_tiny_jit())
    fast = kernels.enable(copy.deepcopy(plain))
    assert all(type(b.attn) is kernels.JiTAttentionQK for b in fast.blocks)
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 2])
    # the CPU: plain paths
    torch.testing.assert_close(fast(x, t, y)[0], plain(x, t, y)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_kernels_jit_on_gpu_takes_the_qk_kernel_and_matches_the_pytorch_path(monkeypatch):
    torch.manual_seed(0)
    plain = _randomize(_tiny_jit()).cuda()
    for blk in plain.blocks:
        blk.attn.q_norm.weight.data.normal_(1, 0.2)
    fast = copy.deepcopy(plain)
    # the q/k fast path alone (the patch conv's matrix product would round unlike cuDNN's TF32)
    for blk in fast.blocks:
        blk.attn.__class__ = kernels.JiTAttentionQK
    x, t, y = (torch.randn(2, 3, 32, 32, device="cuda"), torch.rand(2, device="cuda"),
               torch.tensor([1, 2], device="cuda"))
    calls, op = [], kernels.qk_norm_rope
    monkeypatch.setattr(kernels, "qk_norm_rope", lambda *a: calls.append(1) or op(*a))

    def run(m, bf16):
        m.zero_grad()
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            out, h = m(x, t, y, align_depth=2)
        (out.float().square().sum() + h.float().sum()).backward()
        return [out.detach().float()] + [p.grad.clone() for p in m.parameters() if p.requires_grad]
    got32, got16 = run(fast, False), run(fast, True)
    assert len(calls) == 2 * 2 * len(fast.blocks)             # q and k of every block, both runs
    ref32, ref16 = run(plain, False), run(plain, True)         # the PyTorch definition
    err = lambda a, b: max(((u - v).norm() / v.norm().clamp_min(1e-12)).item()
                           for u, v in zip(a, b))
    assert err(got32, ref32) < 1e-5, err(got32, ref32)
    assert err(got16, ref32) < 1.2 * err(ref16, ref32) + 1e-3, (err(got16, ref32),
                                                                err(ref16, ref32))



def _steps_of(tmp_path, *flags, device="cpu"):
    """8 training steps of a tiny run: (the step, its outputs, the parameters after)."""
    args = train.get_args(["--out-dir", str(tmp_path / "run"), "--num-generated", "64",
                           "--batch-size", "8", "--steps", "8", *flags])
    device = torch.device(device)
    objective, encoder, vae, emas, opt = train.build(args, device)
    step = train.make_step(args, objective, encoder, vae, emas, opt, device, 1)
    outs = []
    for s, (x, y, lat) in enumerate(train.load_data(args, vae, device, 0, 1, 0)):
        torch.manual_seed(s)
        opt.param_groups[0]["lr"] = 1e-3 * (s + 1) / 8  # a warm-up: the graph reads each lr
        outs.append(step(x, y, lat).cpu())
    return step, outs, [p.detach().cpu() for p in [*objective.parameters(), *emas[0].parameters()]]


def test_cuda_graphs_are_not_asked_of_the_cpu(tmp_path):
    step, outs, _ = _steps_of(tmp_path, "--cuda-graphs", "--no-compile", "--precision", "fp32",
                              "--image-size", "32")
    assert not isinstance(step, kernels.GraphedStep) and all(o.isfinite().all() for o in outs)


def test_cuda_graphs_off_for_repae_is_said_once(tmp_path, monkeypatch, capsys):
    # REPA-E's four updates are not graphed: on a GPU its step stays plain and says so (the step
    # is only built here, never run, so a CPU stands in for the GPU's device name)
    _repae_tiny(monkeypatch)
    args = train.get_args([*_REPAE, "--cuda-graphs", "--out-dir", str(tmp_path)])
    objective, encoder, vae, emas, opt = train.build(args, torch.device("cpu"))
    step = train.make_step(args, objective, encoder, vae, emas, opt, torch.device("cuda"), 1)
    assert not isinstance(step, kernels.GraphedStep)
    out = capsys.readouterr().out
    assert out.count("--cuda-graphs: off under DDP and --repae") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_graphed_step_repeats_the_plain_step_bit_for_bit_on_gpu(tmp_path):
    """Same kernels, same seeds, the lr read from its buffer: the replays repeat the plain step
    (bit for bit on an H100 for SiT-B/2; JiT's Triton q/k backward: ~6e-7 run to run)."""
    irepa = ["--encoder", "dinov2-vit-s", "--encoder-weights", "random", "--irepa"]
    plain = _steps_of(tmp_path / "plain", *irepa, "--no-cuda-graphs", device="cuda")
    graphed = _steps_of(tmp_path / "graphed", *irepa, "--cuda-graphs", device="cuda")
    assert isinstance(graphed[0], kernels.GraphedStep) and graphed[0].graph is not None
    for a, b in zip(plain[1] + plain[2], graphed[1] + graphed[2]):
        assert ((a.float() - b.float()).norm() / a.float().norm().clamp_min(1e-12)) < 1e-5


# =============================================================================
# sample.py

import argparse  # noqa: E402
from PIL import Image  # noqa: E402


class _sample_Toy(nn.Module):
    """Deterministic nonlinear stand-in for SiT / JiT: depends on x, t and y (null class included);
    records (t, batch size) of every call."""

    def __init__(self, channels=4, size=4, num_classes=10, fail_after=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.in_channels, self.input_size, self.num_classes = channels, size, num_classes
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = nn.Embedding(num_classes + 1, channels)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.calls, self.fail_after = [], fail_after

    def forward(self, x, t, y):
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls.append((t[0].item(), len(x)))
        return (torch.tanh(self.conv(x)) * (1 + self.emb(y)[:, :, None, None])
                + torch.sin(3 * t)[:, None, None, None] * x, None)


def _sample_inputs(channels=4):
    return (torch.randn(3, channels, 4, 4, generator=torch.Generator().manual_seed(1)),
            torch.tensor([0, 4, 9]))


def _sample_run(name, net, noise, y, steps, cfg=1.0, low=0.0, high=1.0):
    if name == "euler":
        return sample.sit_sampler(net, noise, y, steps, "ode", cfg, low, high)
    if name == "heun":
        return sample.sit_sampler(net, noise, y, steps, "heun", cfg, low, high)
    if name == "sde":
        return sample.sit_sampler(net, noise, y, steps, "sde", cfg, low, high,
                                  torch.Generator().manual_seed(2))
    return sample.jit_sampler(net, noise, y, steps, name == "jit-heun", cfg, (low, high))


def test_sample_network_evaluations():
    noise, y = _sample_inputs()
    for name, steps, want in [("euler", 7, 7), ("heun", 7, 13), ("sde", 40, 40),
                              ("jit-heun", 50, 99), ("jit-euler", 9, 9)]:
        for cfg in (1.0, 2.0):
            net = _sample_Toy()
            out = _sample_run(name, net, noise, y, steps, cfg)
            assert len(net.calls) == want, (name, cfg)
            assert (out.shape == noise.shape
                    and out.dtype == (torch.float32 if "jit" in name else torch.float64))
            # CFG doubles the batch, one forward
            assert all(b == (6 if cfg != 1.0 else 3) for _, b in net.calls)


def test_sample_cfg_scale_one_is_no_cfg_and_mixes_cond_uncond():
    noise, y = _sample_inputs()
    net = _sample_Toy()
    for name in ("euler", "heun", "sde", "jit-heun"):
        plain = _sample_run(name, net, noise, y, 5)
        assert torch.equal(_sample_run(name, net, noise, y, 5, 1.0, 0.2, 0.8), plain)
        assert not torch.allclose(_sample_run(name, net, noise, y, 5, 2.5), plain)
    # one guided evaluation == uncond + s (cond - uncond) from two separate forwards
    x, t = noise.double(), 0.37
    tt = torch.full((3,), t)
    cond = net(x.float(), tt, y)[0].double()
    uncond = net(x.float(), tt, torch.full_like(y, 10))[0].double()
    got = sample.guided(net, x, t, y, 2.5, True, torch.float32)
    assert torch.allclose(got, uncond + 2.5 * (cond - uncond), atol=1e-6)


def test_sample_guidance_interval_switches_as_official():
    noise, y = _sample_inputs(3)
    net = _sample_Toy(3)
    _sample_run("jit-heun", net, noise, y, 50, 3.0, 0.1, 1.0)
    guided_t = sorted({t for t, b in net.calls if b == 6})
    plain_t = {t for t, b in net.calls if b == 3}
    assert guided_t[0] == pytest.approx(0.12) and any(t == pytest.approx(0.1) for t in plain_t)
    assert max(plain_t) < 0.11 and guided_t[-1] == pytest.approx(0.98)
    # SiT: low <= t <= high, both ends included; the step's t decides for both Heun calls
    net = _sample_Toy()
    _sample_run("heun", net, noise.new_zeros(3, 4, 4, 4) + 1, y, 10, 2.0, 0.3, 0.6)
    assert sorted(round(t, 6) for t, b in net.calls if b == 6) == [0.2, 0.3, 0.3, 0.4,
                                                                   0.4, 0.5, 0.5, 0.6]


@pytest.mark.parametrize("name,grid,want", [
    ("euler", torch.linspace(1, 0, 5, dtype=torch.float64), [0, 1, 1, 1]),
    ("sde", torch.linspace(1, 0.04, 5, dtype=torch.float64), [0, 1, 1, 1, 0]),
    ("jit-euler", torch.linspace(0, 1, 5), [0, 0, 1, 0])])
def test_sample_guidance_interval_ends_on_grid_times(name, grid, want):
    # the interval's ends are grid times exactly (linspace(1, 0, 11) never lands on 0.3): SiT
    # guides at both ends, JiT at neither, as official
    noise, y = _sample_inputs()
    net = _sample_Toy()
    low, high = sorted(grid[[1, 3]].tolist())
    _sample_run(name, net, noise, y, len(want), 2.0, low, high)
    assert [int(b == 6) for _, b in net.calls] == want


def test_sample_ode_exact_for_point_mass():
    # data = one point mu: v(x, t) = (x - mu) / t is exact,
    # and Euler / Heun on the straight paths land on mu
    mu = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))

    class Ideal(nn.Module):
        num_classes = 10

        def forward(self, x, t, y):
            return (x - mu) / t[:, None, None, None], None

    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    for heun in (False, True):
        out = sample.sit_sampler(Ideal(), noise, torch.tensor([1, 2]), 8, "heun" if heun else "ode")
        assert torch.allclose(out, mu.double(), atol=1e-6)


def _sample_exact(family, kind, steps, cfg=1.0, mus=(_MU, 0.0), scale=1.0):
    # the exact model (train.py's section) on 4000 images of 2x2 pixels; the noise it starts from
    net = _ExactGaussian(family, list(mus), noise_scale=scale)
    noise = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(4000, dtype=torch.long)
    if family == "jit":
        return sample.jit_sampler(net, scale * noise, y, steps, True, cfg), noise.double()
    return sample.sit_sampler(net, noise, y, steps, kind, cfg), noise.double()


# (family, sampler, steps, max error): the ODE maps noise n to _MU + _SD n, up to its step error
_SAMPLE_ODES = [("sit", "ode", 200, 0.03), ("sit", "heun", 20, 0.015), ("jit", "heun", 20, 0.05)]


@pytest.mark.parametrize("family,kind,steps,tol", _SAMPLE_ODES)
def test_sample_ode_of_the_exact_model_maps_noise_onto_the_data(family, kind, steps, tol):
    scale = 2.0 if family == "jit" else 1.0  # JiT's initial noise std (512 px)
    x, noise = _sample_exact(family, kind, steps, scale=scale)
    assert (x.double() - (_MU + _SD * noise)).abs().max() < tol


@pytest.mark.parametrize("family,kind,steps,tol", _SAMPLE_ODES[1:])
def test_sample_guidance_of_the_exact_model_moves_the_mean_by_the_cfg_formula(family, kind, steps,
                                                                              tol):
    # velocities and x-predictions are affine in the class mean: scale s gives the data
    # N(mu_null + s (mu_y - mu_null), _SD^2) exactly
    x, noise = _sample_exact(family, kind, steps, cfg=2.0, mus=(_MU, -0.5))
    assert (x.double() - (-0.5 + 2.0 * (_MU + 0.5) + _SD * noise)).abs().max() < tol


def test_sample_sde_of_the_exact_model_reproduces_the_data():
    net = _ExactGaussian("sit", [_MU, 0.0])
    noise = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    y = torch.zeros(4000, dtype=torch.long)
    x = sample.sit_sampler(net, noise, y, 250, "sde", generator=g).double()
    assert abs(x.mean().item() - _MU) < 0.02 and abs(x.std().item() - _SD) < 0.015
    ref = torch.Generator().manual_seed(1)  # noise in every step but the last, drift-only, one
    for _ in range(249):
        torch.randn(noise.shape, generator=ref, dtype=torch.float64)
    assert torch.equal(g.get_state(), ref.get_state())


def test_sample_sde_steps_are_reps_euler_maruyama_by_formula():
    # REPA's euler_maruyama_sampler retyped: w(t) = 2t on linspace(1, 0.04, N) then 0, the score
    # from the velocity s = -(x + (1 - t) v) / t, x += dt (v - w s / 2) + sqrt(w) sqrt(|dt|) eps,
    # the last step drift only; CFG on the velocity
    noise, y = _sample_inputs()
    net = _sample_Toy()
    got = _sample_run("sde", net, noise, y, 4, 2.0)
    g = torch.Generator().manual_seed(2)
    ts = torch.linspace(1, 0.04, 4, dtype=torch.float64).tolist() + [0.0]
    x = noise.double()
    for i, (t, t_next) in enumerate(zip(ts, ts[1:])):
        v = [net(x.float(), torch.full((3,), t), c)[0].double()
             for c in (y, torch.full_like(y, net.num_classes))]
        v = v[1] + 2.0 * (v[0] - v[1])
        x = x + (t_next - t) * (v - 0.5 * (2 * t) * -(x + (1 - t) * v) / t)
        if i < 3:
            eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
            x = x + math.sqrt(2 * t) * math.sqrt(abs(t_next - t)) * eps
    torch.testing.assert_close(got, x, rtol=1e-6, atol=1e-6)


def test_sample_generate_maps_to_uint8_as_official_jit_rounds_and_sit_truncates(monkeypatch):
    # [-1, 1] -> 255 (x + 1) / 2, clamped to [0, 255]; JiT's code rounds, REPA's SiT casts
    x = torch.tensor([-2.0, -1.0, -0.5, 0.5, 0.999, 1.5]).view(1, 1, 2, 3).expand(1, 3, 2, 3)
    monkeypatch.setattr(sample, "sample_latents", lambda *a: x)
    y = torch.zeros(1, dtype=torch.long)
    for family, want in (("jit", [0, 0, 64, 191, 255, 255]), ("sit", [0, 0, 63, 191, 254, 255])):
        got = sample.generate(None, y, family)
        assert got.shape == (1, 2, 3, 3) and got.dtype == torch.uint8
        assert got[0, ..., 0].flatten().tolist() == want


def test_sample_generate_runs_jit_ode_as_euler_and_heun_as_heun():
    # N steps: Euler evaluates N times, Heun 2N - 1 (none after the last step)
    y = torch.tensor([0, 4, 9])
    for mode, calls in (("ode", 5), ("heun", 9)):
        net = _sample_Toy(channels=3)
        sample.generate(net, y, "jit", mode=mode, num_steps=5)
        assert len(net.calls) == calls, mode


def test_sample_save_grid_layout(tmp_path):
    imgs = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 2, 4, 3).contiguous() * 40
    for images in (imgs, imgs.numpy()):  # train.py's grid passes a tensor, sample.py's an array
        data.save_grid(images, tmp_path / "g.png")
        g = np.asarray(Image.open(tmp_path / "g.png"))
        assert g.shape == (4, 12, 3)  # 5 images -> 3 columns, 2 rows of 2x4 tiles
        assert g[2, 4, 0] == 4 * 40 and g[0, 8, 0] == 2 * 40 and g[3, 11, 0] == 0
    with pytest.raises(TypeError):  # the grid keeps the images' dtype, which PIL refuses
        data.save_grid(imgs.float(), tmp_path / "g.png")


def _shard_seed(seed, shard):  # sample.py: shard s draws its labels and noise from (seed, s)
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


def _sample_args(out, n, labels="balanced", extra=()):
    return sample.parser.parse_args(["--ckpt", "toy.pt", "--model", "JiT-toy", "--mode", "heun",
                                     "--num-steps", "2", "--cfg-scale", "2.0",
                                     "--guidance-low", "0.0", "--guidance-high", "1.0",
                                     "--noise-scale", "1.0", "--labels", labels,
                                     "--num-samples", str(n), "--batch-size", "4",
                                     "--out", str(out), *extra])


def _sample_worker(rank, port, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=2)
    sample.sample_to_file(_sample_Toy(3, 8), None, _sample_args(out, 10, "uniform"), rank, 2)
    torch.distributed.destroy_process_group()


def test_sample_two_processes_write_the_same_npz(tmp_path):
    sample.sample_to_file(_sample_Toy(3, 8), None,
                          _sample_args(tmp_path / "one.npz", 10, "uniform"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_sample_worker, (port, str(tmp_path / "two.npz")),
                                          nprocs=2, start_method="fork")
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert one["arr_0"].shape == (10, 8, 8, 3) and one["arr_0"].dtype == np.uint8
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
    assert (len(set(map(bytes, one["arr_0"]))) == 10
            and not os.path.exists(tmp_path / "two.npz.shards"))


def test_sample_interrupted_run_resumes(tmp_path):
    full = _sample_args(tmp_path / "full.npz", 10)
    sample.sample_to_file(_sample_Toy(3, 8), None, full)
    args = _sample_args(tmp_path / "cut.npz", 10)
    with pytest.raises(KeyboardInterrupt):  # 3 evaluations per shard: dies inside the third shard
        sample.sample_to_file(_sample_Toy(3, 8, fail_after=7), None, args)
    assert sorted(os.listdir(tmp_path / "cut.npz.shards")) == ["000000.npz", "000001.npz",
                                                               "settings.json"]
    with pytest.raises(SystemExit, match="holds shards made with --seed 0: rerun with those"):
        sample.sample_to_file(_sample_Toy(3, 8), None,
                              _sample_args(tmp_path / "cut.npz", 10, extra=["--seed", "1"]))
    net = _sample_Toy(3, 8)
    sample.sample_to_file(net, None, args)
    assert len(net.calls) == 3  # only the missing (last, 2-image) shard
    a, b = np.load(tmp_path / "full.npz"), np.load(tmp_path / "cut.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    # balanced labels: class i * C // N
    assert a["arr_1"].tolist() == [i * 10 // 10 for i in range(10)]


def _sample_ckpt(tmp_path, official=False):
    torch.manual_seed(0)
    net = model.models["JiT-demo/16"](image_size=32, num_classes=10)
    # adaLN-Zero makes a fresh model output 0: give it weights that do something
    for p in net.parameters():
        nn.init.normal_(p, std=0.05)
    sd = net.state_dict()
    # official JiT file: Denoiser keys under 'net.', projector + RoPE tables, Namespace args
    if official:
        sd = {"net." + k: v for k, v in sd.items()}
        sd.update({"net.projectors.0.weight": torch.zeros(3),
                   "net.feat_rope.freqs_cos": torch.zeros(3)})
        ckpt = {"model": sd, "model_ema1": sd, "model_ema2": sd, "epoch": 1,
                "args": argparse.Namespace(model="JiT-demo/16", img_size=32, class_num=10,
                                           noise_scale=1.0)}
    else:
        ckpt = {"model": sd, "ema": sd,
                "args": {"model": "JiT-demo/16", "image_size": 32, "num_classes": 10}}
    path = tmp_path / ("official.pth" if official else "ours.pt")
    torch.save(ckpt, path)
    return str(path)


def test_sample_ctrl_c_keeps_the_shards_and_says_the_same_command_goes_on(tmp_path):
    out = tmp_path / "s.npz"
    cmd = [sys.executable, os.path.join(_ROOT, "sample.py"), "--ckpt", _sample_ckpt(tmp_path),
           "--num-samples", "40", "--batch-size", "1", "--num-steps", "50", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_CPU)
    first, deadline = tmp_path / "s.npz.shards" / "000000.npz", time.time() + 300
    while not first.exists() and time.time() < deadline:  # a loaded machine: minutes
        time.sleep(0.02)
    if not first.exists():
        proc.kill()
    assert first.exists(), "no shard written: Ctrl-C would land in the imports"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err and proc.returncode == 1 and not out.exists()
    assert (err.strip().splitlines()[-1]
            == "interrupted: the finished shards are kept; the same command goes on from them")
    subprocess.run(cmd, check=True, capture_output=True, env=_CPU)
    assert np.load(out)["arr_0"].shape == (40, 32, 32, 3)


def test_sample_cli_npz_and_official_checkpoint(tmp_path, cpu_only):
    flags = ["--num-steps", "2", "--num-samples", "6", "--batch-size", "4",
             "--cfg-scale", "2.0", "--grid", "4"]
    sample.main(["--ckpt", _sample_ckpt(tmp_path), "--out", str(tmp_path / "a.npz"), *flags])
    sample.main(["--ckpt", _sample_ckpt(tmp_path, True), "--out", str(tmp_path / "b.npz"), *flags])
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["arr_0"].shape == (6, 32, 32, 3) and a["arr_0"].dtype == np.uint8
    assert a["arr_0"].std() > 3  # not a constant image
    assert a["arr_1"].tolist() == [0, 1, 3, 5, 6, 8]  # balanced by default for JiT: i * 10 // 6
    assert np.array_equal(a["arr_0"], b["arr_0"])
    # shard 1 (samples 4, 5) again by hand: labels,
    # noise and sampler from its own (seed 0, shard 1) generator
    net = model.models["JiT-demo/16"](image_size=32, num_classes=10)
    net.load_state_dict(torch.load(_sample_ckpt(tmp_path), weights_only=False)["ema"])
    g = torch.Generator().manual_seed(_shard_seed(0, 1))
    want = sample.generate(net.eval(), torch.tensor([6, 8]), "jit", None, "heun", 2, 2.0,
                           (0.1, 1.0), 1.0, g)
    assert np.array_equal(a["arr_0"][4:], want.numpy())
    assert Image.open(tmp_path / "a.png").size == (64, 64)
    sample.main(["--ckpt", _sample_ckpt(tmp_path), "--out", str(tmp_path / "g.png"), *flags[:-2]])
    assert Image.open(tmp_path / "g.png").size == (96, 64)


def test_sample_bad_input_is_named(tmp_path, capsys):
    ckpt = _sample_ckpt(tmp_path)
    for argv, msg in [(["--num-classes", "20"],
                       "[11, 128] in the file, [21, 128] expected (--model JiT-demo/16)"),
                      (["--out", str(tmp_path / "no" / "x.npz")], "not writable"),
                      (["--out", str(tmp_path / "x.jpg")], "must end in .npz or .png"),
                      (["--out", f"{__file__}/x.npz"], "does not exist or is not writable"),
                      (["--mode", "sde"], "does not fit this checkpoint: use --mode heun or ode"),
                      (["--num-samples", "0"], "--num-samples: must be at least 1"),
                      (["--grid", "-1"], "--grid: must be at least 0"),
                      (["--batch-size", "0"], "--batch-size: must be at least 1"),
                      (["--seed", "-1"], "--seed: must be at least 0"),
                      (["--guidance-low", "0.9", "--guidance-high", "0.1"],
                       "--guidance-low 0.9 is above --guidance-high")]:
        with pytest.raises(SystemExit):
            sample.main(["--ckpt", ckpt, "--num-steps", "1", *argv])
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(tmp_path / "missing.pt")])
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"PK not a checkpoint")
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(tmp_path / "junk.pt")])
    assert (f"--ckpt {tmp_path / 'junk.pt'}: not a file torch can read as weights"
            in capsys.readouterr().err)


def test_sample_run_folder_resumes_only_with_the_same_checkpoint(tmp_path, monkeypatch, cpu_only):
    # --ckpt RUN means its newest checkpoint:
    # shards of an interrupted run must not mix in a newer one
    run = tmp_path / "run"
    os.makedirs(run / "checkpoints")
    os.rename(_sample_ckpt(tmp_path), run / "checkpoints" / "0000002.pt")
    flags = ["--ckpt", str(run), "--num-steps", "1", "--num-samples", "4", "--batch-size", "2",
             "--out", str(tmp_path / "s.npz")]
    real, calls = sample.generate, []

    def killed_after_one_shard(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(sample, "generate", killed_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        sample.main(flags)
    monkeypatch.setattr(sample, "generate", real)
    shutil.copy(run / "checkpoints" / "0000002.pt", run / "checkpoints" / "0000004.pt")
    with pytest.raises(SystemExit, match="holds shards made with --ckpt .*0000002.pt: rerun"):
        sample.main(flags)


def test_sample_never_overwrites_a_finished_output(tmp_path, capsys, cpu_only):
    flags = ["--ckpt", _sample_ckpt(tmp_path), "--num-steps", "1", "--num-samples", "2",
             "--out", str(tmp_path / "s.npz")]
    sample.main(flags)
    first = (tmp_path / "s.npz").read_bytes()
    with pytest.raises(SystemExit):
        sample.main([*flags, "--seed", "1"])
    assert f"{tmp_path / 's.npz'} exists already: pass another --out" in capsys.readouterr().err
    assert (tmp_path / "s.npz").read_bytes() == first
    grid = tmp_path / "t.png"  # the grid an .npz --out writes beside it is a finished output too
    grid.write_bytes(b"mine")
    with pytest.raises(SystemExit):
        sample.main([*flags[:-1], str(tmp_path / "t.npz"), "--grid", "2"])
    assert f"{grid} exists already" in capsys.readouterr().err and grid.read_bytes() == b"mine"
    torch.save([1, 2], tmp_path / "list.pt")  # a torch file that is no checkpoint: one line
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(tmp_path / "list.pt"), "--out", str(tmp_path / "u.png")])
    err = capsys.readouterr().err
    assert ("list.pt: holds a list, not named tensors" in err and "Traceback" not in err
            and len(err.strip().splitlines()) == 1)


class _sample_FakeVAE(nn.Module):
    """Stands in for the SD-VAE: 'decodes' (B, 4, r, r) latents to (B, 3, 8r, 8r) images
    in [-1, 1]."""

    def unscale(self, z):
        return z / 0.18215

    def decode(self, z):
        return torch.nn.functional.interpolate(z[:, :3], scale_factor=8).tanh()


def test_sample_cli_official_sit_checkpoint(tmp_path, monkeypatch, capsys, cpu_only):
    tiny = lambda image_size, num_classes: model.SiT(image_size, 2, 64, 2, 4,
                                                     num_classes=num_classes)
    monkeypatch.setitem(model.models, "SiT-B/2", tiny)  # the name an official checkpoint carries
    import encoders
    vaes = []  # the weights argument of each load_vae call
    monkeypatch.setattr(encoders, "load_vae",
                        lambda weights, stats: vaes.append(weights) or _sample_FakeVAE())
    torch.manual_seed(0)
    net = tiny(32, 10)
    for p in net.parameters():
        nn.init.normal_(p, std=0.05)
    sd = {**net.state_dict(), "projectors.0.projection_layer.weight": torch.zeros(3)}
    torch.save({"model": {}, "ema": sd, "opt": {}, "steps": 5,
                "args": argparse.Namespace(model="SiT-B/2", resolution=32, num_classes=10)},
               tmp_path / "o.pt")
    sample.main(["--ckpt", str(tmp_path / "o.pt"), "--num-steps", "1", "--num-samples", "1",
                 "--out", str(tmp_path / "h.npz")])
    sample.main(["--ckpt", str(tmp_path / "o.pt"), "--vae-weights", "x", "--num-steps", "3",
                 "--num-samples", "5", "--batch-size", "2", "--out", str(tmp_path / "s.npz")])
    # no VAE named by the checkpoint or the flags: the hub's sd-vae-ft-mse (load_vae(None))
    assert vaes == [None, "x"]
    out = np.load(tmp_path / "s.npz")
    assert (out["arr_0"].shape == (5, 32, 32, 3) and out["arr_0"].dtype == np.uint8
            and out["arr_0"].std() > 3)
    assert out["arr_1"].dtype == np.int64 and 0 <= out["arr_1"].min() and out["arr_1"].max() < 10
    assert len(set(out["arr_1"].tolist())) > 1  # uniform random labels by default for SiT
    # sample 4 = shard 2 alone: SDE from the (seed 0, shard 2) generator,
    # official truncation to uint8
    g = torch.Generator().manual_seed(_shard_seed(0, 2))
    net.eval()
    y = torch.randint(10, (1,), generator=torch.Generator().manual_seed(_shard_seed(0, 2)))
    z = sample.sit_sampler(net, torch.randn(1, 4, 4, 4, generator=g), y, 3, "sde", generator=g)
    want = (255 * (_sample_FakeVAE().decode(_sample_FakeVAE().unscale(z.float())) + 1) / 2).clamp(
        0, 255)
    assert (out["arr_1"][4] == y.item()
            and np.array_equal(out["arr_0"][4], want[0].permute(1, 2, 0).byte().numpy()))
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(tmp_path / "o.pt"), "--vae-weights", "x", "--image-size", "64"])
    assert ("does not fit: pos_embed is [1, 4, 64] in the file, [1, 16, 64] expected "
            "(--model SiT-B/2)" in capsys.readouterr().err)


def _error_line(err):
    # an argparse error as users see it:
    # the usage (wrapped on indented lines), then one "prog: error:" line
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[0].startswith("usage:"), err
    assert all(line.startswith(" ") for line in lines[1:-1]) and ": error: " in lines[-1], err
    return lines[-1]


def _sample_one_line(err):
    # a flag error as users see it (data.Parser): one line, the reason and "(see --help)"
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.strip().endswith("(see --help)"), err
    return err.strip()


class _sample_Trap:
    """Unpickling it calls open(marker, "w"): a pickle-loaded checkpoint holding it runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_sample_checkpoint_holding_code_is_refused_unrun(tmp_path, capsys):
    marker, path = tmp_path / "ran", tmp_path / "trap.pt"
    ckpt = torch.load(_sample_ckpt(tmp_path), weights_only=False)
    torch.save({**ckpt, "trap": _sample_Trap(marker)}, path)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(path), "--num-steps", "1", "--num-samples", "1",
                     "--out", str(tmp_path / "s.png")])
    line = _sample_one_line(capsys.readouterr().err)  # names the function the file would call
    assert e.value.code == 2 and f"--ckpt {path}: refused: it holds io.open" in line
    assert not marker.exists() and not (tmp_path / "s.png").exists()
    # the premise: pickle itself would have run it
    torch.load(path, weights_only=False)["trap"].close()
    assert marker.exists()


def test_sample_default_out_goes_beside_the_checkpoint(tmp_path, monkeypatch, capsys, cpu_only):
    run, cwd = tmp_path / "run", tmp_path / "cwd"
    os.makedirs(run / "checkpoints")
    os.makedirs(cwd)
    monkeypatch.chdir(cwd)
    os.rename(_sample_ckpt(tmp_path), run / "checkpoints" / "0000002.pt")
    flags = ["--num-steps", "1", "--num-samples", "4", "--batch-size", "4"]
    # a run folder: its newest checkpoint, grid under RUN/samples/
    sample.main(["--ckpt", str(run), *flags])
    grid = run / "samples" / "sample-0000002.png"
    assert (Image.open(grid).size == (64, 64)
            and f"wrote {grid}: 4 images" in capsys.readouterr().out)
    # any other file: beside it
    sample.main(["--ckpt", _sample_ckpt(tmp_path, official=True), *flags])
    assert Image.open(tmp_path / "official-samples.png").size == (64, 64)
    assert os.listdir(cwd) == [] and sorted(os.listdir(run / "samples")) == ["sample-0000002.png"]


def test_sample_missing_vae_weights_is_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hf
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))  # nothing cached, and no download
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    tiny = lambda image_size, num_classes: model.SiT(image_size, 2, 64, 2, 4,
                                                     num_classes=num_classes)
    monkeypatch.setitem(model.models, "SiT-B/2", tiny)
    args = argparse.Namespace(model="SiT-B/2", resolution=32, num_classes=10)
    torch.save({"ema": tiny(32, 10).state_dict(), "args": args}, tmp_path / "o.pt")
    flags = ["--ckpt", str(tmp_path / "o.pt"), "--num-samples", "1",
             "--out", str(tmp_path / "s.png")]
    for argv, want in [(["--vae-weights", "/nonexistent/file.safetensors"],
                        "--vae-weights /nonexistent/file.safetensors: no such file"),
                       ([],
                        "sd-vae-ft-mse/diffusion_pytorch_model.safetensors are not cached here")]:
        with pytest.raises(SystemExit) as e:
            sample.main(flags + argv)
        line = _sample_one_line(capsys.readouterr().err)
        assert e.value.code == 2 and want in line
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "s.png.shards").exists()

# =============================================================================
# metrics.py

import csv  # noqa: E402
import metrics  # noqa: E402


def _metrics_smooth(B=4, H=16, D=64, seed=0):
    # tokens that vary slowly with position:
    # a 4x4 random field upsampled bilinearly to H x H, (B, H*H, D)
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(B, D, 4, 4, generator=g), size=(H, H),
                         mode="bilinear").flatten(2).transpose(1, 2)


def _metrics_bruteforce(z, H, W, near, far):
    # LDS, CDS with explicit loops over token pairs of one image (T, D):
    # independent of the vectorised code
    u = [v / v.norm() for v in z.double()]
    pos = [(t // W, t % W) for t in range(H * W)]
    by_d = {}
    for t in range(H * W):
        for s in range(H * W):
            d = abs(pos[t][0] - pos[s][0]) + abs(pos[t][1] - pos[s][1])
            by_d.setdefault(d, []).append(float(u[t] @ u[s]))
    mean = lambda ds: np.mean([c for d in ds for c in by_d[d]])
    ds = [d for d in range(1, 9) if d in by_d]
    slope = np.polyfit(ds, [mean([d]) for d in ds], 1)[0]
    return mean(range(1, near + 1)) - mean([d for d in by_d if d >= far]), -slope


def test_metrics_match_bruteforce_loops():
    z = torch.randn(2, 36, 8) + _metrics_smooth(2, 6, 8)  # a 6x6 grid
    for b in range(2):
        want_lds, want_cds = _metrics_bruteforce(z[b], 6, 6, near=1, far=6)
        assert metrics.spatial_metrics(z)["lds"][b].item() == pytest.approx(want_lds, abs=1e-6)
        assert metrics.spatial_metrics(z)["cds"][b].item() == pytest.approx(want_cds, abs=1e-6)
    z = _metrics_smooth(2, 8, 16) + 0.5 * torch.randn(2, 64, 16)
    # appendix B: 0 < d < H/2 vs d >= H/2
    want_paper, _ = _metrics_bruteforce(z[0], 8, 8, near=3, far=4)
    assert (metrics.spatial_metrics(z, paper=True)["lds"][0].item()
            == pytest.approx(want_paper, abs=1e-6))


def test_metrics_srss_matches_bruteforce_loop():
    H = W = 6
    z, fg = torch.randn(1, H * W, 8) + _metrics_smooth(1, 6, 8), torch.rand(1, H * W) > 0.4
    deltas = []
    for t in range(H * W):
        if not fg[0, t]:
            continue
        cos = lambda s: F.cosine_similarity(z[0, t], z[0, s], dim=0).item()
        d = lambda s: abs(t // W - s // W) + abs(t % W - s % W)
        pos = [cos(s) for s in range(H * W) if fg[0, s] and d(s) == 1]
        neg = [cos(s) for s in range(H * W) if not fg[0, s] and d(s) >= 6]
        if pos and neg:
            deltas.append(np.mean(pos) - np.mean(neg))
    assert len(deltas) > 3
    assert metrics.spatial_metrics(z, fg)["srss"].item() == pytest.approx(np.mean(deltas), abs=1e-6)


def test_metrics_smooth_field_is_structured():
    out, paper = (metrics.spatial_metrics(_metrics_smooth()),
                  metrics.spatial_metrics(_metrics_smooth(), paper=True))
    assert (out["lds"] > 0.1).all() and (out["cds"] > 0.01).all() and (paper["lds"] > 0.1).all()


def test_metrics_iid_noise_has_no_structure():
    z = torch.randn(4, 256, 768, generator=torch.Generator().manual_seed(0))
    out = metrics.spatial_metrics(z)
    assert out["lds"].abs().max() < 0.01 and out["cds"].abs().max() < 0.002
    # unit vectors in general position: mean_t |u_t - mean u|^2 = 1 - |mean u|^2 ~ 1 - 1/T
    assert out["rmsc"] == pytest.approx(torch.full((4,), (1 - 1 / 256) ** 0.5), abs=0.01)


def test_metrics_identical_tokens_have_zero_rmsc():
    z = (torch.randn(3, 1, 32) + 2).expand(3, 256, 32)
    # the sqrt would turn fp32 cancellation noise into ~1e-4
    assert metrics.spatial_metrics(z)["rmsc"].abs().max() < 1e-6
    assert metrics.spatial_metrics(_metrics_smooth())["rmsc"].min() > 0.1


def test_metrics_rmsc_matches_a_bruteforce_loop_far_from_zero_and_one():
    torch.manual_seed(0)
    z = torch.randn(3, 16, 8) + torch.tensor([2.0] + [0.0] * 7)  # rmsc ~0.6 to 0.7
    want = []
    for img in z.double():
        u = img / img.norm(dim=-1, keepdim=True)
        want.append(((u - u.mean(0)) ** 2).sum(-1).mean().sqrt())
    want = torch.stack(want)
    assert 0.3 < want.min() and want.max() < 0.9
    assert torch.allclose(metrics.spatial_metrics(z)["rmsc"].double(), want, atol=1e-5)


def test_metrics_global_vector_hides_structure_until_spatial_norm():
    z = _metrics_smooth() + 4 * torch.randn(1, 1, 64)  # the same global vector in every token
    lds = lambda z: metrics.spatial_metrics(z)["lds"]
    raw, normed = lds(z), lds(metrics.spatial_norm(z, 1.0))
    assert (raw < normed).all() and (normed - raw).min() > 0.1
    assert (lds(_metrics_smooth()) > raw).all()


def test_metrics_srss_two_regions():
    B, H, D = 3, 16, 64
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(B, 1, D, generator=g), torch.randn(B, 1, D, generator=g)
    left = (torch.arange(H * H) % H < H // 2)[None].expand(B, -1)  # (B, T) left half = foreground
    z = torch.where(left[..., None], a, b) + 0.3 * torch.randn(B, H * H, D, generator=g)
    srss = lambda z, masks: metrics.spatial_metrics(z, masks)["srss"]
    assert (srss(z, left) > 0.5).all() and (srss(z, ~left) > 0.5).all()
    # uniform tokens: near and far similarity are equal, SRSS ~ 0; no background at all: NaN
    assert srss(torch.randn(B, H * H, D, generator=g), left).abs().max() < 0.02
    assert srss(z, torch.ones(B, H * H, dtype=torch.bool)).isnan().all()
    with pytest.raises(RuntimeError):  # not one foreground flag per token
        srss(z, left[:, :100])


def test_metrics_masks_only_add_srss():
    # one Gram matrix for all metrics: masks add SRSS and change nothing else; CDS ignores paper=
    z, masks = _metrics_smooth(3) + torch.randn(3, 256, 64), torch.rand(3, 256) > 0.5
    out = metrics.spatial_metrics(z, masks, paper=True)
    plain, paper = metrics.spatial_metrics(z), metrics.spatial_metrics(z, paper=True)
    assert "srss" not in plain and out["srss"].isfinite().all()
    for k, v in {"lds": paper["lds"], "cds": plain["cds"], "rmsc": plain["rmsc"]}.items():
        torch.testing.assert_close(out[k], v)


def test_metrics_grid_must_be_square():
    # every encoder, fed square images, gives a square grid
    with pytest.raises(ValueError, match="12 tokens are not a square grid"):
        metrics.spatial_metrics(torch.randn(2, 12, 8))


def test_metrics_pearson_with_gfid(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"enc{i}" for i in range(6)]
    lds_v, cds_v, lp = rng.normal(size=6), rng.normal(size=6), rng.normal(size=6)
    gfid = 20 - 5 * lds_v  # exactly linear in LDS: r = -1
    path = tmp_path / "fid.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(
            [["encoder", "gfid", "linear_probe"]] + [[n, g, p] for n, g, p in zip(names, gfid, lp)])
    means = {n: {"lds": float(a), "cds": float(c), "rmsc": 0.5}
             for n, a, c in zip(names, lds_v, cds_v)}
    means["enc0"]["rmsc"] = 0.7
    means["not-in-table"] = {"lds": 0.0, "cds": 0.0, "rmsc": 0.0}
    corr, got_gfid = metrics.fid_correlations(metrics.read_fid_table(path), means)
    assert got_gfid == pytest.approx(gfid)
    assert corr["LDS"][0] == pytest.approx(-1.0)
    assert corr["CDS"][0] == pytest.approx(np.corrcoef(cds_v, gfid)[0, 1])
    assert corr["linear probe"][0] == pytest.approx(np.corrcoef(lp, gfid)[0, 1])
    assert corr["RMSC"][0] == pytest.approx(np.corrcoef([0.7] + [0.5] * 5, gfid)[0, 1])
    metrics.draw_scatter(tmp_path / "s.png", corr, got_gfid)
    assert Image.open(tmp_path / "s.png").size == (240 * 4, 240)
    with pytest.raises(ValueError, match="at least 2"):  # scipy's refusal; the CLI asks for 3
        metrics.fid_correlations(metrics.read_fid_table(path), {"enc0": means["enc0"]})
    (tmp_path / "bad.csv").write_text("name,fid\na,1\n")
    with pytest.raises(ValueError, match="encoder,gfid"):
        metrics.read_fid_table(tmp_path / "bad.csv")


def test_metrics_load_folder_center_crops(tmp_path):
    img = np.zeros((512, 1024, 3), np.uint8)
    img[:, :512] = (255, 0, 0)  # left half red, right half blue
    img[:, 512:] = (0, 0, 255)
    Image.fromarray(img).save(tmp_path / "a.png")
    # box-halved to 512x256, then the centre 256 columns: 128..384
    x, masks = metrics.load_folder(tmp_path)
    assert x.shape == (1, 3, 256, 256) and x.dtype == torch.uint8 and masks is None
    assert (x[0, :, :, :120] == torch.tensor([255, 0, 0])[:, None, None]).all()
    assert (x[0, :, :, 136:] == torch.tensor([0, 0, 255])[:, None, None]).all()


def _metrics_toy_encoder(name, resolution=256, weights=None):
    # stands in for encoders.load_encoder:
    # a fixed random 16x16 patch embedding plus a global vector, (B, 256, 32)
    g = torch.Generator().manual_seed(len(name))
    w, bias = torch.randn(32, 3, 16, 16, generator=g) / 40, torch.randn(32, generator=g)
    enc = torch.nn.Module()
    enc.forward = (lambda x: F.conv2d(x.float() / 255, w, stride=16).flatten(2).transpose(1, 2)
                   + bias)
    return enc


def _metrics_write_images(folder, masks_folder, n=5):
    folder.mkdir()
    masks_folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = 300 + 20 * i, 400
        img = np.kron(rng.integers(0, 255, (h // 20 + 1, w // 20 + 1, 3)),
                      np.ones((20, 20, 1)))[:h, :w].astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: 3 * h // 4, w // 3: 2 * w // 3] = 1  # values 0/1 like label maps
        Image.fromarray(img).save(folder / f"im{i}.png")
        Image.fromarray(mask).save(masks_folder / f"im{i}.png")


def test_metrics_cli_end_to_end(tmp_path, monkeypatch, capsys, cpu_only):
    names = ["toy-a", "toy-bb", "toy-ccc"]
    for n in names:
        monkeypatch.setitem(metrics.ENCODERS, n, None)
    monkeypatch.setattr(metrics, "load_encoder", _metrics_toy_encoder)
    _metrics_write_images(tmp_path / "img", tmp_path / "mask")
    with open(tmp_path / "fid.csv", "w") as f:
        f.write("encoder,gfid\ntoy-a,10\ntoy-bb,12\ntoy-ccc,15\n")
    out = tmp_path / "out"
    metrics.main(["--encoder", *names, "--images", str(tmp_path / "img"),
                  "--masks", str(tmp_path / "mask"), "--batch-size", "2", "--spnorm-gamma", "0.6",
                  "--save", f"{out}.json", "--viz", f"{out}.png",
                  "--fid-table", str(tmp_path / "fid.csv")])
    printed = capsys.readouterr().out
    assert ("toy-bb +spnorm(0.6)" in printed and "SRSS" in printed
            and "Pearson r with gFID (3 encoders)" in printed)
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["num_images"] == 5 and len(result["means"]) == 6
    # the CLI's means = the metric functions on the same crops,
    # masks pooled to 16x16 (any foreground pixel)
    images, masks = metrics.load_folder(tmp_path / "img", tmp_path / "mask")
    z = _metrics_toy_encoder("toy-a")(images)
    patch_masks = masks.view(5, 16, 16, 16, 16).any(4).any(2).flatten(1)
    assert 0 < patch_masks.float().mean() < 1
    want = {k: torch.nanmean(v).item() for k, v in metrics.spatial_metrics(z, patch_masks).items()}
    assert result["means"]["toy-a"] == pytest.approx(want, abs=1e-6)
    metrics.main(["--encoder", "toy-a", "--images", str(tmp_path / "img"), "--save", f"{out}.csv",
                  "--lds", "paper"])
    rows = list(csv.DictReader(open(f"{out}.csv")))
    assert [r["encoder"] for r in rows] == ["toy-a"] and "srss" not in rows[0]
    assert (float(rows[0]["lds"])
            == pytest.approx(metrics.spatial_metrics(z, paper=True)["lds"].mean().item(), abs=1e-6))
    assert "SRSS omitted" in capsys.readouterr().out
    assert Image.open(f"{out}.png").height == 20 + 3 * 116
    assert Image.open(tmp_path / "fid.pearson.png").size == (240 * 4, 240)
    # all foreground: no anchor has background tokens, SRSS is NaN
    for f in (tmp_path / "mask").iterdir():
        Image.fromarray(np.ones(np.array(Image.open(f)).shape, np.uint8)).save(f)
    metrics.main(["--encoder", "toy-a", "--images", str(tmp_path / "img"),
                  "--masks", str(tmp_path / "mask")])
    assert "SRSS nan: are the masks all one value" in capsys.readouterr().out


def test_metrics_cli_bad_input(tmp_path, monkeypatch, capsys):
    name = next(iter(metrics.ENCODERS))
    (tmp_path / "empty").mkdir()
    _metrics_write_images(tmp_path / "img", tmp_path / "mask", n=2)

    def fails(argv, message):
        with pytest.raises(SystemExit):
            metrics.main(argv)
        assert message in capsys.readouterr().err

    fails(["--encoder", "no-such-encoder"], "unknown encoder(s) no-such-encoder")
    fails([], "give --encoder")
    fails(["--encoder", name, "--images", str(tmp_path / "empty")], "no readable image in")
    fails(["--encoder", name, "--masks", str(tmp_path / "mask")], "--masks needs --images")
    fails(["--encoder", name, "--encoder-weights", "a", "b"], "one value or one per encoder")
    fails(["--encoder", name, "--batch-size", "0"], "must be at least 1")
    (tmp_path / "mask" / "im1.png").rename(tmp_path / "mask" / "other.png")
    fails(["--encoder", name, "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "mask")],
          "no mask of the name and size of image im1.png")
    Image.new("L", (10, 10)).save(tmp_path / "mask" / "im1.png")
    fails(["--encoder", name, "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "mask")],
          "no mask of the name and size of image im1.png (400, 320)")
    enc = torch.nn.Module()
    enc.forward = lambda x: torch.randn(len(x), 200, 8)  # 200 tokens: no square grid
    monkeypatch.setattr(metrics, "load_encoder", lambda *a, **k: enc)
    fails(["--encoder", name, "--images", str(tmp_path / "img")],
          "200 tokens are not a square grid")
    fails(["--encoder", name, "--viz", str(tmp_path / "no" / "v.png")], "--viz")
    (tmp_path / "mine.csv").write_text("made by the user")  # never overwritten
    fails(["--encoder", name, "--save", str(tmp_path / "mine.csv")],
          f"{tmp_path / 'mine.csv'} exists already: pass another --save")
    assert (tmp_path / "mine.csv").read_text() == "made by the user"
    (tmp_path / "bad.csv").write_text("encoder,gfid\nx,abc\n")
    fails(["--fid-table", str(tmp_path / "bad.csv")],
          "need header encoder,gfid[,linear_probe] and numbers")
    fails(["--encoder", name, "--spnorm-gamma", "nan"], "--spnorm-gamma must be a number")
    fails(["--encoder", name, "--save", str(tmp_path / "m.txt")], "must end in .csv or .json")
    (tmp_path / "two.csv").write_text("encoder,gfid\n" + "".join(
        f"{n},{i}\n" for i, n in enumerate(metrics.ENCODERS) if i < 2))
    fails(["--fid-table", str(tmp_path / "two.csv")], "need >= 3 of the scored encoders")


def _metrics_error_line(err):
    # a refusal as users see it: no traceback, and its last line "PROG: why (see --help)"
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.endswith("(see --help)"), err
    return line


def test_metrics_missing_encoder_weights_is_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hf
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))  # nothing cached, and no download
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    _metrics_write_images(tmp_path / "img", tmp_path / "mask", n=2)
    images = ["--images", str(tmp_path / "img")]
    two = ["dino-vit-s", "dinov2-vit-b", "--encoder-weights", "random", "/nonexistent.pth", *images]
    path = "--encoder-weights /nonexistent.pth: no such file"
    hub = ("encoder dinov2-vit-b: weights "
           "timm/vit_base_patch14_dinov2.lvd142m/model.safetensors are not")
    # hub weights: missing as the encoder loads
    for argv, want in [(two, path), (["dinov2-vit-b"], hub)]:
        with pytest.raises(SystemExit) as e:
            metrics.main(["--encoder", *argv, "--num-images", "2"])
        err = capsys.readouterr().err
        line = _metrics_error_line(err)
        assert line == err.strip()  # not even a progress bar before it
        assert e.value.code == 2 and want in line
    # dino-vit-s as if cached (random weights), dinov2-vit-b missing from the hub
    real = metrics.load_encoder
    monkeypatch.setattr(metrics, "load_encoder", lambda name, resolution, weights: real(
        name, resolution, "random" if name == "dino-vit-s" else weights))
    # an encoder scored before one whose weights are missing: its scores are shown
    with pytest.raises(SystemExit):
        metrics.main(["--encoder", "dino-vit-s", "dinov2-vit-b", "--num-images", "2", *images])
    out = capsys.readouterr()
    assert "dino-vit-s: LDS " in out.out and hub in out.err.strip().splitlines()[-1]


def _metrics_class_tree(root, per_class=3):
    # generated images as root/tree/CLASS/N.png, two classes,
    # and as root/flat/CLASS-N.png (the same order)
    images = iter(data.generated_images(2 * per_class, 64)[0].permute(0, 2, 3, 1).numpy())
    os.makedirs(root / "flat")
    for c in ("a", "b"):
        os.makedirs(root / "tree" / c)
        for i in range(per_class):
            im = Image.fromarray(next(images))
            im.save(root / "tree" / c / f"{i}.png")
            im.save(root / "flat" / f"{c}-{i}.png")


def _metrics_means(folder, out, *flags):
    out.unlink(missing_ok=True)  # metrics.py never overwrites a file
    metrics.main(["--encoder", "toy-a", "--images", str(folder), "--save", str(out), *flags])
    return json.loads(out.read_text())


def test_metrics_class_folders_score_like_a_flat_folder(tmp_path, monkeypatch, capsys, cpu_only):
    monkeypatch.setitem(metrics.ENCODERS, "toy-a", None)
    monkeypatch.setattr(metrics, "load_encoder", _metrics_toy_encoder)
    _metrics_class_tree(tmp_path)
    tree = {}
    for n in ("4", "1000"):  # 4: all of class a, then the first of b
        tree[n] = _metrics_means(tmp_path / "tree", tmp_path / "t.json", "--num-images", n)
        assert tree[n] == _metrics_means(tmp_path / "flat", tmp_path / "f.json", "--num-images", n)
        assert tree[n]["num_images"] == min(int(n), 6)
    assert tree["4"]["means"] != tree["1000"]["means"]  # the first 4 are not all
    (tmp_path / "mask").mkdir()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        metrics.main(["--encoder", "toy-a", "--images", str(tmp_path / "tree"), "--masks",
                      str(tmp_path / "mask")])
    assert ("no mask of the name and size of image 0.png"
            in _metrics_error_line(capsys.readouterr().err))


def test_metrics_unreadable_image_is_skipped_by_path(tmp_path, monkeypatch, capsys, cpu_only):
    monkeypatch.setitem(metrics.ENCODERS, "toy-a", None)
    monkeypatch.setattr(metrics, "load_encoder", _metrics_toy_encoder)
    _metrics_class_tree(tmp_path)
    want = {n: _metrics_means(tmp_path / "flat", tmp_path / "w.json", "--num-images", n)
            for n in ("4", "1000")}
    # sorted between the good a-1 and a-2
    for folder, bad in (("flat", "a-1x.png"), ("tree", "a/1x.png")):
        (tmp_path / folder / bad).write_bytes(b"not an image")
        # the first 4 readable ones: the same images as without the bad file
        for n in ("4", "1000"):
            capsys.readouterr()
            assert (_metrics_means(tmp_path / folder, tmp_path / "g.json", "--num-images", n)
                    == want[n])
            assert (f"skipping unreadable image {tmp_path / folder / bad}: "
                    in capsys.readouterr().err)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit):
        metrics.main(["--encoder", "toy-a", "--images", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert f"skipping unreadable image {tmp_path / 'bad' / 'x.png'}" in err
    assert f"no readable image in {tmp_path / 'bad'} (1 " in _metrics_error_line(err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_metrics_gpu_matches_cpu():
    z, masks = _metrics_smooth(8, 16, 768) + torch.randn(8, 256, 768), torch.rand(8, 256) > 0.5
    cpu, gpu = metrics.spatial_metrics(z, masks), metrics.spatial_metrics(z.cuda(), masks.cuda())
    for k in cpu:
        torch.testing.assert_close(gpu[k].cpu(), cpu[k], atol=1e-5, rtol=0)

# =============================================================================
# fid.py

import fid  # noqa: E402


def _fid_oracle_fd(mu1, s1, mu2, s2):
    # float64 oracle through a symmetric route:
    # tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), both via eigh
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.sqrt(np.clip(m, 0, None)).sum())


def _fid_spd(rng, d, n):
    a = rng.standard_normal((n, d))
    return np.cov(a, rowvar=False), a.mean(0)


def test_fid_frechet_identical_is_zero():
    s, mu = _fid_spd(np.random.default_rng(0), 16, 100)
    assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-8


def test_fid_frechet_diagonal_closed_form():
    rng = np.random.default_rng(1)
    a, b, mu1, mu2 = (rng.random(20) + 0.1, rng.random(20) + 0.1, rng.standard_normal(20),
                      rng.standard_normal(20))
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert np.isclose(fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), want, rtol=1e-10)


def test_fid_frechet_random_spd_matches_oracle():
    rng = np.random.default_rng(2)
    for d in (3, 64):
        (s1, mu1), (s2, mu2) = _fid_spd(rng, d, 4 * d), _fid_spd(rng, d, 3 * d)
        assert np.isclose(fid.frechet_distance(mu1, s1, mu2, s2),
                          _fid_oracle_fd(mu1, s1, mu2, s2), rtol=1e-8)
    # rank-deficient covariances (n < d)
    (s1, mu1), (s2, mu2) = _fid_spd(rng, 64, 10), _fid_spd(rng, 64, 12)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got) and np.isclose(got, _fid_oracle_fd(mu1, s1, mu2, s2), rtol=1e-4)
    # numpy refuses statistics that do not match
    with pytest.raises(ValueError, match="not aligned"):
        fid.frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def test_fid_frechet_rank_deficient_2048_stays_finite():
    rng = np.random.default_rng(3)
    a, b = np.r_[rng.random(1024), np.zeros(1024)], rng.random(2048)  # sigma1 has rank 1024 of 2048
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's / our singular-product warnings
        got = fid.frechet_distance(np.zeros(2048), np.diag(a), np.ones(2048), np.diag(b))
    assert np.isfinite(got)
    assert np.isclose(got, 2048 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rtol=1e-6)


def test_fid_inception_score_synthetic():
    assert np.isclose(fid.inception_score(np.zeros((100, 1008))), 1.0)
    k = 10
    onehot = np.eye(1008)[np.arange(1000) % k] * 60.0  # near one-hot, k balanced classes
    assert np.isclose(fid.inception_score(onehot), k, rtol=1e-6)
    # consecutive splits: first split a single class (IS 1),
    # second k balanced classes (IS k) -> mean
    two = np.concatenate([np.eye(1008)[np.zeros(50, int)], np.eye(1008)[np.arange(50) % k]]) * 60.0
    assert np.isclose(fid.inception_score(two, split_size=50), (1 + k) / 2, rtol=1e-6)


def test_fid_inception_score_matches_a_loop():
    # per split, exp of the mean over images of KL(p(y|x) || p(y)), p(y) the split's mean
    logits = np.random.default_rng(5).standard_normal((12, 7)) * 2
    want = []
    for part in (logits[:8], logits[8:]):
        p = [np.exp(row) / np.exp(row).sum() for row in part]
        marginal = sum(p) / len(p)
        kl = [sum(a * math.log(a / b) for a, b in zip(q, marginal)) for q in p]
        want.append(math.exp(sum(kl) / len(kl)))
    assert fid.inception_score(logits, split_size=8) == pytest.approx(np.mean(want), rel=1e-12)


def _fid_oracle_pr(ref, smp, k):
    d = lambda a, b: ((a[:, None].astype(np.float64) - b[None]) ** 2).sum(-1)
    # self excluded
    radius = lambda x: np.array([np.sort(np.delete(d(x, x)[i], i))[k - 1] for i in range(len(x))])
    r_ref, r_smp = radius(ref), radius(smp)
    precision = np.mean([(d(s[None], ref)[0] <= r_ref).any() for s in smp])
    recall = np.mean([(d(r[None], smp)[0] <= r_smp).any() for r in ref])
    return precision, recall


def test_fid_precision_recall_matches_bruteforce():
    rng = np.random.default_rng(4)
    # small integers: fp16 distances are exact,
    # so ADM's fp16 path must equal the float64 oracle, ties included
    ref = rng.integers(0, 4, (40, 16)).astype(np.float32)
    smp = rng.integers(0, 3, (33, 16)).astype(np.float32)  # a narrower set: recall < 1
    smp[::5] += 3  # outliers: precision < 1
    want = _fid_oracle_pr(ref, smp, 3)
    got = fid.precision_recall(torch.from_numpy(ref), torch.from_numpy(smp), k=3)
    assert got == pytest.approx(want, abs=1e-12) and 0 < want[0] < 1 and 0 < want[1] < 1
    blocked = fid.precision_recall(torch.from_numpy(ref), torch.from_numpy(smp), k=3, batch=7)
    assert blocked == got
    # values too large for fp16 -> the block falls back to fp32, still equal to the oracle
    big_ref, big_smp = rng.standard_normal((30, 8)) * 300, rng.standard_normal((25, 8)) * 300 + 100
    got = fid.precision_recall(torch.tensor(big_ref, dtype=torch.float32),
                               torch.tensor(big_smp, dtype=torch.float32))
    assert got == pytest.approx(_fid_oracle_pr(big_ref, big_smp, 3), abs=1e-12)
    with pytest.raises(RuntimeError, match="out of range"):  # k=3 needs 4 rows (evaluate: 4 images)
        fid.precision_recall(torch.zeros(3, 4), torch.zeros(10, 4))


def test_fid_tf1_resize_matches_numpy_loop():
    rng = np.random.default_rng(5)
    img = (rng.random((2, 3, 11, 13)) * 255).astype(np.float32)
    for size in (7, 29):
        want = np.zeros((2, 3, size, size), np.float32)
        sy, sx = np.float32(11) / np.float32(size), np.float32(13) / np.float32(size)
        for y in range(size):
            fy = np.float32(y) * sy
            y0, y1, ly = int(np.floor(fy)), min(int(np.ceil(fy)), 10), fy - np.floor(fy)
            for x in range(size):
                fx = np.float32(x) * sx
                x0, x1, lx = int(np.floor(fx)), min(int(np.ceil(fx)), 12), fx - np.floor(fx)
                top = img[:, :, y0, x0] + (img[:, :, y0, x1] - img[:, :, y0, x0]) * lx
                bot = img[:, :, y1, x0] + (img[:, :, y1, x1] - img[:, :, y1, x0]) * lx
                want[:, :, y, x] = top + (bot - top) * ly
        np.testing.assert_allclose(fid.tf1_resize(torch.from_numpy(img), size).numpy(), want,
                                   rtol=0, atol=1e-4)
    x = torch.from_numpy(img[:, :, :, :11].copy())
    assert torch.equal(fid.tf1_resize(x, 11), x)  # same size is the identity


def test_fid_state_dict_matches_published_layout():
    with open(os.path.join(os.path.dirname(fid.__file__), "fixtures", "inception_keys.txt")) as f:
        want = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    got = [f"{k} {tuple(v.shape)}" for k, v in fid.FIDInception().state_dict().items()]
    assert got == want


def test_fid_inception_outputs_spatial_order_and_batch_invariance():
    torch.manual_seed(0)
    model = fid.FIDInception().eval()
    model.fc.bias.data.fill_(5.0)  # must not reach the logits
    seen = {}
    model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.__setitem__("nchw", o))
    x = torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8)
    with torch.no_grad():
        pool, spatial, logits = model(x)
        pool1, spatial1, _ = model(x[1:])
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023) and logits.shape == (2, 1008)
    want = seen["nchw"][:1, :7].numpy().transpose(0, 2, 3, 1).reshape(1, -1)  # (1,17,17,7) in H,W,C
    np.testing.assert_array_equal(spatial1.numpy(), want)
    torch.testing.assert_close(logits, pool @ model.fc.weight.T)
    assert pool.std(0).mean() > 0 and (pool >= 0).all()  # ReLU features that vary with the image
    torch.testing.assert_close(pool1, pool[1:], rtol=1e-5, atol=1e-5 * pool.abs().max().item())
    torch.testing.assert_close(spatial1, spatial[1:], rtol=1e-5,
                               atol=1e-5 * spatial.abs().max().item())


def test_fid_inception_sees_the_tf_graphs_input_scaling():
    torch.manual_seed(0)
    m = fid.FIDInception().eval()
    seen = []
    m.Conv2d_1a_3x3.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0]))
    x = torch.randint(0, 256, (1, 40, 40, 3), dtype=torch.uint8)
    with torch.no_grad():
        m(x)
    resized = fid.tf1_resize(x.permute(0, 3, 1, 2).float())
    assert torch.equal(seen[0], (resized - 128) / 128)  # the TF graph's Sub 128, Mul 1/128


def test_fid_npz_streaming_equals_np_load(tmp_path):
    imgs = np.random.default_rng(6).integers(0, 256, (11, 5, 6, 3), dtype=np.uint8)
    for save in (np.savez, np.savez_compressed):
        path = str(tmp_path / f"{save.__name__}.npz")
        save(path, imgs, labels=np.arange(11))
        shape, read = fid.open_images(path)
        assert shape == imgs.shape
        np.testing.assert_array_equal(np.concatenate(list(read(0, 11, 4))), np.load(path)["arr_0"])
        np.testing.assert_array_equal(np.concatenate(list(read(3, 8, 2))), imgs[3:8])


def test_fid_checks_inputs_before_the_weights_and_warns_under_2048_images(tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.setattr(fid, "load_inception",
                        lambda *a, **k: pytest.fail("weights loaded before the input check"))
    np.savez(tmp_path / "nchw.npz", np.zeros((4, 3, 8, 8), np.uint8))
    with pytest.raises(SystemExit):
        fid.main([str(tmp_path / "nchw.npz"), "--ref", str(tmp_path / "missing.npz")])
    assert "NCHW" in capsys.readouterr().err
    np.savez(tmp_path / "few.npz", np.full((4, 8, 8, 3), 7, np.uint8))
    with pytest.raises(SystemExit):
        fid.main([str(tmp_path / "few.npz"), "--ref", str(tmp_path / "missing.npz")])
    assert "missing.npz: no such file" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="4 images; FID is biased.*2,048"), \
            pytest.raises(pytest.fail.Exception):
        fid.main([str(tmp_path / "few.npz"), "--save-stats", str(tmp_path / "s.npz")])


def test_fid_bad_inputs(tmp_path, monkeypatch, capsys, cpu_only):
    cases = {"float32": (np.zeros((4, 8, 8, 3), np.float32), "uint8"),
             "nchw": (np.zeros((4, 3, 8, 8), np.uint8), "NCHW"),
             "unit": (np.ones((4, 8, 8, 3), np.uint8), r"not \[0,1\]")}
    for name, (arr, msg) in cases.items():
        np.savez(tmp_path / f"{name}.npz", arr)
        with pytest.raises(ValueError, match=msg):
            fid.features(None, str(tmp_path / f"{name}.npz"))
    np.savez(tmp_path / "noarr.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="no arr_0"):
        fid.open_images(str(tmp_path / "noarr.npz"))
    np.save(tmp_path / "plain.npy", np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="not an .npz"):
        fid.open_images(str(tmp_path / "plain.npy"))
    with pytest.raises(ValueError, match="--ref .*plain.npy: not an .npz"):
        fid.evaluate(None, str(tmp_path / "unit.npz"), str(tmp_path / "plain.npy"))
    np.savez(tmp_path / "badref.npz", mu=np.zeros(2048))
    with pytest.raises(ValueError, match="--ref .*badref.npz: no arr_0"):  # nor mu and sigma
        fid.evaluate(None, str(tmp_path / "unit.npz"), str(tmp_path / "badref.npz"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ValueError,
                       match="pt_inception-2015-12-05-6726825d.pth or weights-inception-2015"):
        fid.load_inception()
    monkeypatch.setattr(fid.FIDInception, "forward", _fid_fake_forward)
    dark = np.zeros((6, 8, 8, 3), np.uint8)
    dark[4:] = 200  # an all-black first batch is legal
    np.savez(tmp_path / "dark.npz", dark)
    assert (fid.features(fid.FIDInception(), str(tmp_path / "dark.npz"), batch_size=2)[0].shape
            == (6, 2048))
    dark[4:] = 1  # values 0/1, the first 1 in the last batch: refused once all are read
    np.savez(tmp_path / "dark01.npz", dark)
    with pytest.raises(ValueError, match=r"not \[0,1\]"):
        fid.features(fid.FIDInception(), str(tmp_path / "dark01.npz"), batch_size=2)
    np.savez(tmp_path / "one.npz", np.full((1, 8, 8, 3), 7, np.uint8))
    with pytest.raises(ValueError, match="1 image\\(s\\); the statistics need at least 4"):
        fid.evaluate(fid.FIDInception(), str(tmp_path / "one.npz"), str(tmp_path / "one.npz"))
    with pytest.raises(SystemExit):
        fid.main([str(tmp_path / "one.npz"), "--save-stats", str(tmp_path / "no" / "s.npz")])
    assert "--save-stats" in capsys.readouterr().err
    (tmp_path / "mine.json").write_text("made by the user")  # never overwritten
    with pytest.raises(SystemExit):
        fid.main([str(tmp_path / "one.npz"), "--json", str(tmp_path / "mine.json")])
    assert "mine.json exists already: pass another --json" in capsys.readouterr().err
    assert (tmp_path / "mine.json").read_text() == "made by the user"
    np.savez(tmp_path / "narrow.npz", mu=np.zeros(10), sigma=np.eye(10))  # not Inception's
    with pytest.raises(SystemExit):  # before the samples' features and the weights
        fid.main([str(tmp_path / "dark.npz"), "--ref", str(tmp_path / "narrow.npz")])
    assert "narrow.npz: its mu is (10,), not of ADM's Inception" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # np.savez writes stats.npz for "stats": it exists
        fid.main([str(tmp_path / "one.npz"), "--save-stats", str(tmp_path / "one")])
    assert "one.npz exists already: pass another --save-stats" in capsys.readouterr().err
    torch.save(fid.FIDInception().state_dict(), tmp_path / "w.pth")
    with pytest.raises(SystemExit):
        fid.main([str(tmp_path / "one.npz"), "--ref", str(tmp_path / "one.npz"),
                  "--inception", str(tmp_path / "w.pth")])
    assert "1 image(s); the statistics need at least 4" in capsys.readouterr().err


def _fid_fake_forward(self, x):
    # cheap deterministic stand-in for the Inception forward, same output shapes:
    # (B,H,W,3) uint8 -> pool, spatial, logits
    # One image at a time: the values must not depend on how the images are batched, and a CPU's
    # matrix product may round differently for different batch sizes.
    g = torch.Generator().manual_seed(0)
    w_pool, w_spatial = torch.randn(48, 2048, generator=g), torch.randn(48, 2023, generator=g)
    out = []
    for f in x[:, :4, :4].reshape(len(x), 1, -1).float() / 255:  # (1, 48) each
        pool = torch.relu(f @ w_pool)
        out.append((pool, f @ w_spatial, pool @ self.fc.weight.T))
    return tuple(torch.cat(t) for t in zip(*out))


def test_fid_cli_end_to_end(tmp_path, monkeypatch, capsys, cpu_only):
    rng = np.random.default_rng(8)
    samples, ref = (rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8),
                    rng.integers(0, 256, (10, 24, 24, 3), dtype=np.uint8))
    stored_mu, stored_sigma = rng.standard_normal(2048), np.eye(2048)
    np.savez(tmp_path / "s.npz", samples)
    # no mu_s: sFID from arr_0 features
    np.savez(tmp_path / "ref.npz", ref, mu=stored_mu, sigma=stored_sigma)
    torch.manual_seed(0)
    # legacy file
    sd = {k: v for k, v in fid.FIDInception().state_dict().items()
          if "num_batches_tracked" not in k}
    torch.save(sd, tmp_path / "w.pth")
    monkeypatch.setattr(fid.FIDInception, "forward", _fid_fake_forward)
    # a 2048-d sqrtm is slow
    fd_stub = lambda m1, s1, m2, s2: float(np.abs(m1 - m2).sum() + np.abs(s1 - s2).mean())
    monkeypatch.setattr(fid, "frechet_distance", fd_stub)
    args = [str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"),
            "--inception", str(tmp_path / "w.pth"), "--json", str(tmp_path / "m.json"),
            "--save-stats", str(tmp_path / "st.npz"), "--batch-size", "5"]
    with pytest.warns(UserWarning) as record:
        fid.main(args)
    assert (any("50,000" in str(w.message) for w in record)
            and any("resolution" in str(w.message) for w in record))
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == ["Inception Score", "FID", "sFID",
                                                       "Precision", "Recall"]
    metrics = json.load(open(tmp_path / "m.json"))
    assert [float(line.split(": ")[1]) for line in lines] == [metrics[line.split(": ")[0]]
                                                              for line in lines]
    model = fid.FIDInception()
    model.load_state_dict(sd, strict=False)
    ps, ss, _ = (t.detach().numpy() for t in _fid_fake_forward(model, torch.from_numpy(samples)))
    pr, sr, _ = (t.detach().numpy() for t in _fid_fake_forward(model, torch.from_numpy(ref)))
    st = np.load(tmp_path / "st.npz")
    np.testing.assert_allclose(st["mu"], ps.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st["sigma_s"], np.cov(ss, rowvar=False), rtol=1e-5, atol=1e-6)
    assert metrics["FID"] == fd_stub(st["mu"], st["sigma"], stored_mu, stored_sigma)
    assert np.isclose(metrics["sFID"],
                      fd_stub(st["mu_s"], st["sigma_s"], sr.mean(0), np.cov(sr, rowvar=False)))
    assert np.isclose(metrics["Inception Score"],
                      fid.inception_score(ps @ sd["fc.weight"].numpy().T), rtol=1e-6)
    assert ((metrics["Precision"], metrics["Recall"])
            == fid.precision_recall(torch.from_numpy(pr), torch.from_numpy(ps)))


def test_fid_both_sides_statistics_are_numpys_mean_and_unbiased_covariance(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(fid.FIDInception, "forward", _fid_fake_forward)
    m = fid.FIDInception()
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", arr_0=a)
    np.savez(tmp_path / "b.npz", arr_0=b)
    seen = []  # what FID and sFID are computed from: (mu, sigma) of the samples, then the ref's
    monkeypatch.setattr(fid, "frechet_distance", lambda *args: seen.append(args) or 0.0)
    fid.evaluate(m, str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))
    with torch.no_grad():
        pool = [m(torch.from_numpy(x))[0].double().numpy() for x in (a, b)]
        spatial = [m(torch.from_numpy(x))[1].double().numpy() for x in (a, b)]
    for feats, args in zip((pool, spatial), seen):
        for f, mu, sigma in zip(feats, args[::2], args[1::2]):
            centred = f - f.mean(0)
            assert np.allclose(mu, f.mean(0), rtol=1e-5, atol=1e-6)
            assert np.allclose(sigma, centred.T @ centred / (len(f) - 1), rtol=1e-4, atol=1e-8)


# =============================================================================
# repae.py
# The references below are the official REPA-E definitions (loss/lpips.py, loss/discriminator.py,
# loss/losses.py, models/sit.py, train_repae.py), written out as plain formulas on the same weights.

import runpy  # noqa: E402
import timm  # noqa: E402
import repae  # noqa: E402

_REPAE_TAPS = (3, 8, 15, 22, 29)  # relu1_2 ... relu5_3: the ends of the official LPIPS vgg16 slices


def _repae_stage(seed=0, res=32, conv=True, **kw):
    """A tiny stage: SiT (64 wide, 4 blocks, 10 classes), a small SD-VAE, LPIPS and PatchGAN."""
    torch.manual_seed(seed)
    net = _randomize(_tiny_sit(image_size=res), seed)  # non-zero output: every phase has gradients
    proj = align.ConvProjector(64, 12) if conv else align.MLPProjector(64, 12, width=256)
    vae = encoders.VAE(widths=(8, 16, 16, 16), layers=1, groups=4)
    vae.latent_scale.copy_(torch.tensor([0.5, 1.0, 2.0, 0.8]).view(1, 4, 1, 1))
    vae.latent_shift.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]).view(1, 4, 1, 1))
    disc = repae.PatchGAN(ndf=8)
    torch.manual_seed(123)  # LPIPS is fixed (loaded from files), the same in every stage
    # 16 channels: no position has a near-zero feature norm, where LPIPS's normalisation
    # 1 / (norm + 1e-10) would make the gradient ill-conditioned (narrower layers have some)
    lpips = repae.LPIPS(widths=(16, 16, 16, 16, 16))
    return repae.Stage(net, proj, vae, lpips, disc, align_depth=2, gamma=0.6 if conv else None,
                       coeff=1.0, **kw)


def _repae_batch(seed, B=4, res=32, T=4, Dz=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (B, 3, res, res), generator=g, dtype=torch.uint8)
    return x, torch.randint(0, 10, (B,), generator=g), torch.randn(B, T, Dz, generator=g)


def _repae_vgg_taps(sd, x):
    # torchvision's / timm's vgg16.features from a state dict (features.N.*), the LPIPS taps
    taps = []
    for i in range(30):
        if f"features.{i}.weight" in sd:
            x = F.conv2d(x, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1)
        elif i in (4, 9, 16, 23):
            x = F.max_pool2d(x, 2, 2)
        else:
            x = F.relu(x)
        if i in _REPAE_TAPS:
            taps.append(x)
    return taps


def _repae_lpips_ref(sd, lins, a, b):
    # official LPIPS.forward: (B, 1, 1, 1); REPA-E's perceptual loss maps its inputs with 2x - 1
    a, b = a * 2. - 1., b * 2. - 1.
    shift = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
    scale = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]
    outs0 = _repae_vgg_taps(sd, (a - shift) / scale)
    outs1 = _repae_vgg_taps(sd, (b - shift) / scale)
    val = 0
    for f0, f1, w in zip(outs0, outs1, lins):
        n0 = f0 / (torch.sqrt(torch.sum(f0 ** 2, dim=1, keepdim=True)) + 1e-10)
        n1 = f1 / (torch.sqrt(torch.sum(f1 ** 2, dim=1, keepdim=True)) + 1e-10)
        val = val + F.conv2d((n0 - n1) ** 2, w).mean([2, 3], keepdim=True)
    return val


def _repae_rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_repae_lpips_layout_files_and_official_formula(tmp_path):
    with torch.device("meta"):
        tm = timm.create_model("vgg16", pretrained=False)
    want = {k: v.shape for k, v in tm.state_dict().items() if k.startswith("features.")}
    got = repae.LPIPS()
    assert {f"features.{k}": v.shape for k, v in got.features.state_dict().items()} == want
    assert [type(m) for m in got.features] == [type(m) for m in tm.features][:30]  # + a pool
    # a VGG16 file as timm / torchvision write it (the classifier is ignored), LPIPS's lin file
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * (2 / s[1:].numel()) ** 0.5 if len(s) == 4 else
          torch.randn(s, generator=g) * 0.1 for k, s in want.items()}
    sd["head.fc.weight"] = torch.zeros(3, 3)
    lins = [torch.rand(1, c, 1, 1, generator=g) for c in (64, 128, 256, 512, 512)]
    torch.save(sd, tmp_path / "vgg16.pth")
    torch.save({f"lin{k}.model.1.weight": w for k, w in enumerate(lins)}, tmp_path / "vgg.pth")
    a = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    b = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    lp = repae.load_lpips(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"))
    ref = _repae_lpips_ref(sd, lins, a, b)
    assert ref.shape == (3, 1, 1, 1) and _repae_rel(lp(a, b), ref.flatten()) < 1e-5
    assert not any(p.requires_grad for p in lp.parameters())
    with pytest.warns(UserWarning, match="RANDOM"):
        with pytest.raises(ValueError, match="--repae-vgg .*missing.pth: no such file"):
            repae.load_lpips(str(tmp_path / "missing.pth"), "random")
        with pytest.raises(ValueError, match="--repae-lpips .*none.pth: no such file"):
            repae.load_lpips("random", str(tmp_path / "none.pth"))


@pytest.mark.filterwarnings("ignore:REPA-E's LPIPS has RANDOM weights")
def test_repae_loss_files_that_do_not_fit_are_one_line(tmp_path):
    # --repae-vgg, --repae-lpips, --repae-disc: a wrong key or shape names the flag, the file and
    # the first misfit, never torch's many-line load_state_dict error
    vgg = {f"features.{k}": v for k, v in repae.LPIPS().features.state_dict().items()}
    vgg["features.0.weight"] = torch.zeros(64, 3, 1, 1)
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "vgg.pth")
    torch.save({"main.0.weight": torch.zeros(64, 3, 4, 4)}, tmp_path / "disc.pt")
    for load, flag, want in [
            (lambda: repae.load_lpips(str(tmp_path / "vgg16.pth"), "random"), "--repae-vgg",
             "0.weight is [64, 3, 1, 1] in the file, [64, 3, 3, 3] expected"),
            (lambda: repae.load_lpips("random", str(tmp_path / "vgg.pth")), "--repae-lpips",
             "missing key lin1.model.1.weight"),
            (lambda: repae.load_discriminator(str(tmp_path / "disc.pt")), "--repae-disc",
             "missing key main.0.bias")]:
        with pytest.raises(ValueError) as e:
            load()
        _one_line(str(e.value), flag, want)
        assert "does not fit" in str(e.value)


def test_repae_discriminator_official_layout_init_and_forward(tmp_path):
    with torch.device("meta"):
        disc = repae.PatchGAN()
    names = ("weight", "bias", "running_mean", "running_var")
    bn = lambda i, c: {f"main.{i}.{n}": (c,) for n in names}
    want = {"main.0.weight": (64, 3, 4, 4), "main.0.bias": (64,), "main.2.weight": (128, 64, 4, 4),
            **bn(3, 128), "main.5.weight": (256, 128, 4, 4), **bn(6, 256),
            "main.8.weight": (512, 256, 4, 4), **bn(9, 512), "main.11.weight": (1, 512, 4, 4),
            "main.11.bias": (1,)}
    got = {k: tuple(v.shape) for k, v in disc.state_dict().items() if "num_batches" not in k}
    assert got == want
    torch.manual_seed(0)
    disc = repae.PatchGAN(ndf=16)
    assert abs(disc.main[2].weight.std().item() - 0.02) < 2e-3  # official weights_init
    assert disc.main[3].bias.abs().max() == 0 and abs(disc.main[3].weight.mean().item() - 1) < 0.01
    sd = copy.deepcopy(disc.state_dict())
    x = torch.randn(3, 3, 32, 32)
    h = F.leaky_relu(F.conv2d(x, sd["main.0.weight"], sd["main.0.bias"], stride=2, padding=1), 0.2)
    for conv, norm, stride in ((2, 3, 2), (5, 6, 2), (8, 9, 1)):  # conv (no bias), BN in train mode
        h = F.conv2d(h, sd[f"main.{conv}.weight"], stride=stride, padding=1)
        mu, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
        h = (h - mu) / torch.sqrt(var + 1e-5) * sd[f"main.{norm}.weight"].view(1, -1, 1, 1)
        h = F.leaky_relu(h + sd[f"main.{norm}.bias"].view(1, -1, 1, 1), 0.2)
    ref = F.conv2d(h, sd["main.11.weight"], sd["main.11.bias"], stride=1, padding=1)
    assert ref.shape == (3, 1, 2, 2) and _repae_rel(disc(x), ref) < 1e-5
    full = repae.PatchGAN().eval()  # a file of the official names loads strictly
    torch.save(full.state_dict(), tmp_path / "disc.pt")
    assert torch.equal(repae.load_discriminator(str(tmp_path / "disc.pt")).eval()(x), full(x))
    torch.save(sd, tmp_path / "small.pt")
    with pytest.raises(ValueError, match=r"small.pt does not fit: main.0.weight is \[16, 3, 4, "
                       r"4\] in the file, \[64, 3, 4, 4\] expected"):
        repae.load_discriminator(str(tmp_path / "small.pt"))
    with pytest.raises(ValueError, match="--repae-disc .*none.pt: no such file"):
        repae.load_discriminator(str(tmp_path / "none.pt"))


def _repae_adamw(params, grads, state, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    # torch.optim.AdamW with weight decay 0, after the official clip_grad_norm_(params, 1.0), its
    # total norm as torch computes it (fp32: ~1e-4 off on the CPU for a 2048 x 2048 matrix)
    total = torch.nn.utils.get_total_norm(grads)
    coef = min(1.0, 1.0 / (total.item() + 1e-6))
    state.setdefault("grads", []).append([g * coef for g in grads])
    for p, g in zip(params, grads):
        g = g * coef
        m, v, n = state.get(p, (torch.zeros_like(p), torch.zeros_like(p), 0))
        m, v, n = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g, n + 1
        state[p] = (m, v, n)
        with torch.no_grad():
            p -= lr * (m / (1 - beta1 ** n)) / ((v / (1 - beta2 ** n)).sqrt() + eps)


def _repae_align_ref(proj, hidden, z, gamma):
    # models/sit.py's proj_loss with iREPA's projector and spatial norm (SPEC.md)
    B, T, D = hidden.shape
    if isinstance(proj, align.ConvProjector):
        g = int(T ** 0.5)
        w = proj.projection_layer
        grid = hidden.transpose(1, 2).reshape(B, D, g, g)
        z_tilde = F.conv2d(grid, w.weight, w.bias, padding=1).reshape(B, -1, T).transpose(1, 2)
    else:
        lin = [m for m in proj.projection_layer if isinstance(m, nn.Linear)]
        h = F.silu(F.linear(hidden, lin[0].weight, lin[0].bias))
        h = F.silu(F.linear(h, lin[1].weight, lin[1].bias))
        z_tilde = F.linear(h, lin[2].weight, lin[2].bias)
    if gamma is not None:
        z = (z - gamma * z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + 1e-6)
    cos = (F.normalize(z_tilde, dim=-1) * F.normalize(z, dim=-1)).sum(dim=-1)  # (B, T)
    return (-cos).mean(dim=1).sum() / B


def _repae_reference_step(r, x, y, target, st, lr=1e-4, decay=0.9, depth=2):
    """One train_repae.py step on the modules in r, by formula; st: the three AdamW states."""
    vae, net, proj, disc = r["vae"], r["net"], r["proj"], r["disc"]
    img = x.float() / 127.5 - 1.
    B = img.shape[0]
    # 1) VAE forward: DiagonalGaussianDistribution, sample, decode
    mean, logvar = torch.chunk(vae.quant_conv(vae.encoder(img)), 2, dim=1)
    logvar = torch.clamp(logvar, -30.0, 20.0)
    std, var = torch.exp(0.5 * logvar), torch.exp(logvar)
    z = mean + std * torch.randn(mean.shape)
    recon = vae.decoder(vae.post_quant_conv(z))
    # 2) generator loss + vae_align_proj_coeff * proj_loss, SiT in eval mode (bn running stats)
    rec = F.l1_loss(img, recon, reduction="mean")
    perc = _repae_lpips_ref(r["lpips_sd"], r["lins"], img, recon).mean()
    kl = 0.5 * torch.sum(torch.pow(mean, 2) + var - 1.0 - logvar, dim=[1, 2, 3])
    kl = torch.sum(kl) / kl.shape[0]
    gan = -torch.mean(disc(recon))
    t = torch.rand((B, 1, 1, 1))
    noises = torch.randn(z.shape)
    rm, rv = r["bn_mean"].view(1, -1, 1, 1), r["bn_var"].view(1, -1, 1, 1)
    normalized = (z - rm) / torch.sqrt(rv + 1e-4)
    hidden = net((1 - t) * normalized + t * noises, t.flatten(), y, depth)[1]
    vae_align = _repae_align_ref(proj, hidden, target, r["gamma"])
    vae_loss = rec + 1.0 * perc + 1e-6 * kl + 0.1 * 1.0 * gan + 1.5 * vae_align
    params = list(vae.parameters())
    _repae_adamw(params, torch.autograd.grad(vae_loss, params), st["vae"], lr)
    # 3) discriminator: hinge on the detached reconstruction, real and fake in separate calls
    logits_real, logits_fake = disc(img.detach()), disc(recon.detach())
    d_loss = 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))
    params = list(disc.parameters())
    _repae_adamw(params, torch.autograd.grad(d_loss, params), st["disc"], lr)
    # 4) SiT in train mode: BatchNorm batch statistics on z.detach(), label dropout, same t, noise
    zd = z.detach()
    mu, var_b = zd.mean(dim=(0, 2, 3)), zd.var(dim=(0, 2, 3), unbiased=False)
    normalized = (zd - mu.view(1, -1, 1, 1)) / torch.sqrt(var_b.view(1, -1, 1, 1) + 1e-4)
    r["bn_mean"] = 0.9 * r["bn_mean"] + 0.1 * mu
    r["bn_var"] = 0.9 * r["bn_var"] + 0.1 * zd.var(dim=(0, 2, 3), unbiased=True)
    y = torch.where(torch.rand(B) < 0.1, 10, y)
    out, hidden = net((1 - t) * normalized + t * noises, t.flatten(), y, depth)
    denoise = torch.mean((out - (noises - normalized)) ** 2, dim=(1, 2, 3)).mean()
    proj_loss = _repae_align_ref(proj, hidden, target, r["gamma"])
    loss = denoise + r["coeff"] * proj_loss
    params = [*net.parameters(), *proj.parameters()]  # pos_embed too: requires_grad(model, True)
    for p in params:
        p.requires_grad_(True)
    _repae_adamw(params, torch.autograd.grad(loss, params), st["sit"], lr)
    # 5) EMA of every SiT parameter and the BatchNorm's float buffers
    with torch.no_grad():
        for e, p in zip(r["ema"].parameters(), net.parameters()):
            e.mul_(decay).add_(p, alpha=1 - decay)
        r["ema_mean"] = r["ema_mean"] * decay + r["bn_mean"] * (1 - decay)
        r["ema_var"] = r["ema_var"] * decay + r["bn_var"] * (1 - decay)
    return dict(loss=loss, denoise=denoise, repa=proj_loss, vae_loss=vae_loss, rec=rec,
                lpips=perc, kl=kl, gan=gan, vae_align=vae_align, d_loss=d_loss)


def _repae_spy_grads(stage):
    """Records, at each optimiser's step, the (clipped) gradient of each of its parameters."""
    seen = {}
    for key in ("opt", "opt_vae", "opt_disc"):
        opt = getattr(stage, key)

        def step(*a, _opt=opt, _step=opt.step, _key=key, **kw):
            params = [p for group in _opt.param_groups for p in group["params"]]
            seen.setdefault(_key, []).append([p.grad.clone() if p.grad is not None else None
                                              for p in params])
            return _step(*a, **kw)
        opt.step = step
    return seen


@pytest.mark.parametrize("conv", [True, False])
def test_repae_two_steps_match_the_official_step_by_formula(conv):
    lr = 1e-4
    stage = _repae_stage(conv=conv, ema_decay=0.9)
    grads = _repae_spy_grads(stage)
    r = dict(vae=copy.deepcopy(stage.vae), net=copy.deepcopy(stage.net),
             proj=copy.deepcopy(stage.proj), disc=copy.deepcopy(stage.disc),
             ema=copy.deepcopy(stage.net), gamma=stage.gamma, coeff=stage.coeff,
             lpips_sd={f"features.{k}": v for k, v in stage.lpips.features.state_dict().items()},
             lins=[m.weight for m in stage.lpips.lins])
    pos_embed = stage.net.pos_embed.detach().clone()
    # init_bn: running mean = latents_bias, running var = 1 / latents_scale^2
    r["bn_mean"] = torch.tensor([0.1, -0.2, 0.0, 0.3])
    r["bn_var"] = 1 / torch.tensor([0.5, 1.0, 2.0, 0.8]) ** 2
    r["ema_mean"], r["ema_var"] = r["bn_mean"].clone(), r["bn_var"].clone()
    assert torch.allclose(stage.bn.running_mean, r["bn_mean"])
    assert torch.allclose(stage.bn.running_var, r["bn_var"])
    st = dict(vae={}, disc={}, sit={})
    for s in range(2):
        x, y, target = _repae_batch(s)
        torch.manual_seed(10 + s)
        got = stage.step(x, y, target)
        torch.manual_seed(10 + s)
        want = _repae_reference_step(r, x, y, target, st, lr)
        for k, v in want.items():  # 1e-5 relative, absolute for losses under 1
            assert abs(got[k].item() - v.item()) <= 1e-5 * max(abs(v.item()), 1), (s, k)
        # parameters after each AdamW step. Adam divides by the gradient's size, so fp32 rounding
        # in small gradient entries shows in their step: every entry within 5% of a step (lr),
        # each tensor on average within 0.1%, but the attention key biases: their gradient is 0
        # in exact arithmetic (softmax ignores a shift shared by a query's logits), rounding noise
        for live, ref in ((stage.net, r["net"]), (stage.proj, r["proj"]), (stage.vae, r["vae"]),
                          (stage.disc, r["disc"])):
            for (k, a), b in zip(live.state_dict().items(), ref.state_dict().values()):
                diff = (a.double() - b.double()).abs()
                assert diff.max() <= 0.05 * lr, (s, k)
                assert diff.mean() <= 1e-3 * lr or k.endswith("to_k.bias"), (s, k)
    # the first step's gradients (clipped, as each optimiser stepped with them): the whole and each
    # tensor within 1e-5 of the reference, relative to the whole gradient's norm (some tensors'
    # gradients are nearly 0 by symmetry, e.g. the attention key biases: rounding noise)
    for key, ref in (("opt_vae", "vae"), ("opt_disc", "disc"), ("opt", "sit")):
        assert len(grads[key]) == len(st[ref]["grads"]) == 2
        got_g, want_g = grads[key][0], st[ref]["grads"][0]
        total = torch.cat([g.flatten() for g in want_g]).double().norm()
        assert _repae_rel(torch.cat([g.flatten() for g in got_g]),
                          torch.cat([g.flatten() for g in want_g])) < 1e-5, key
        for a, b in zip(got_g, want_g):
            assert (a.double() - b.double()).norm() <= 1e-5 * total, key
    assert not torch.equal(stage.net.pos_embed, pos_embed)  # it trains, as in the official code
    for a, b in ((stage.bn.running_mean, r["bn_mean"]), (stage.bn.running_var, r["bn_var"]),
                 (stage.ema_bn.running_mean, r["ema_mean"]),
                 (stage.ema_bn.running_var, r["ema_var"]),
                 *zip(stage.ema_net.parameters(), r["ema"].parameters())):
        assert _repae_rel(a, b) < 1e-5


def test_repae_drops_a_tenth_of_the_labels_in_the_sit_pass_only(monkeypatch):
    # the official drops labels (p 0.1) to the null class in the SiT's update, not in the VAE's
    stage = _repae_stage()
    x, y, target = _repae_batch(0)
    seen, forward = [], stage.net.forward
    monkeypatch.setattr(stage.net, "forward",
                        lambda x, t, y, *a: seen.append(y.clone()) or forward(x, t, y, *a))
    u, rand = torch.tensor([0.05, 0.15, 0.5, 0.95]), torch.rand  # t and the dropout's draw
    monkeypatch.setattr(torch, "rand", lambda *a, **k: u.clone() if a == (4,) else rand(*a, **k))
    stage.step(x, y, target)
    assert torch.equal(seen[0], y) and torch.equal(seen[-1], torch.where(u < 0.1, 10, y))


def test_repae_each_loss_reaches_only_its_own_networks():
    stage = _repae_stage()
    grads = _repae_spy_grads(stage)
    torch.manual_seed(0)
    stage.step(*_repae_batch(0))
    owners = dict(opt=stage.opt, opt_vae=stage.opt_vae, opt_disc=stage.opt_disc)
    for key, seen in grads.items():  # at each optimiser's step: its own gradients, no others
        assert all(g is not None for g in seen[0]), key
        mine = {id(p) for group in owners[key].param_groups for p in group["params"]}
        for m in (stage.net, stage.proj, stage.vae, stage.disc):
            for p in m.parameters():
                assert id(p) in mine or p.grad is None, key  # checked after the step: all cleared
    # the same at step time: the SiT's gradient is empty when the VAE steps, and the reverse
    stage = _repae_stage()
    seen = {}
    for key, opt in (("vae", stage.opt_vae), ("sit", stage.opt)):
        def step(*a, _step=opt.step, _key=key, **kw):
            seen[_key] = dict(sit=[p.grad for p in stage.net.parameters()],
                              proj=[p.grad for p in stage.proj.parameters()],
                              vae=[p.grad for p in stage.vae.parameters()],
                              disc=[p.grad for p in stage.disc.parameters()])
            return _step(*a, **kw)
        opt.step = step
    torch.manual_seed(0)
    stage.step(*_repae_batch(0))
    assert all(g is not None for g in seen["vae"]["vae"])
    assert all(g is None for k in ("sit", "proj", "disc") for g in seen["vae"][k])
    assert all(g is not None for k in ("sit", "proj") for g in seen["sit"][k])  # pos_embed too
    assert all(g is None for k in ("vae", "disc") for g in seen["sit"][k])


def _repae_flat(x, path=""):
    """A nested state dict's leaves by path: /model/blocks.0.attn.qkv.weight, /opt/state/3/step"""
    if isinstance(x, dict):
        return {k: v for key, val in x.items()
                for k, v in _repae_flat(val, f"{path}/{key}").items()}
    return {path: x}


def _repae_differ(a, b):
    """The paths where two nested state dicts differ, and how many leaves the first has."""
    fa, fb = _repae_flat(a), _repae_flat(b)

    def same(k):
        u, v = fa[k], fb[k]
        return torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v
    differ = [k for k in fa.keys() | fb.keys() if k not in fa or k not in fb or not same(k)]
    return sorted(differ), len(fa)


def test_repae_resume_is_exact(tmp_path):
    def run(stage, steps):
        for s in steps:
            torch.manual_seed(100 + s)  # as train.py: step s's noise from (seed, s)
            stage.step(*_repae_batch(s))
    whole = _repae_stage()
    run(whole, range(4))
    first = _repae_stage()
    run(first, range(2))
    state = lambda stage: {key: part.state_dict() for key, part in stage.parts().items()}
    data.save_checkpoint(dict(state(first), args={}, step=2), str(tmp_path / "c.pt"))
    second = _repae_stage(seed=7)  # other weights: the checkpoint must replace every one
    ck = data.read_weights(str(tmp_path / "c.pt"), "--resume")
    for key, part in second.parts().items():  # as train.py resumes
        part.load_state_dict(ck[key])
    run(second, range(2, 4))
    a, b = state(whole), state(second)
    assert set(a) == {"model", "proj", "ema", "bn", "ema_bn", "vae", "discriminator", "opt",
                      "opt_vae", "opt_disc"}
    differ, leaves = _repae_differ(a, b)
    assert not differ and leaves > 100, differ
    assert a["bn"]["num_batches_tracked"] == 4 and not torch.equal(a["ema_bn"]["running_var"],
                                                                   a["bn"]["running_var"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_repae_compiled_stage_repeats_the_eager_one_on_gpu(monkeypatch):
    """train.py --repae --compile compiles the stage's networks in place: over three steps the
    outputs, checkpoint keys and each network's parameter updates stay those of the eager stage
    (fp32, no TF32). Updates, not values: AdamW turns a near-zero gradient's rounding into a
    whole step, so one zero-initialised bias differs by 1.6e-3 of itself between the two."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    results = []
    for compiled in (False, True):
        stage = _repae_stage()
        nets = dict(vae=stage.vae, sit=stage.net, disc=stage.disc)
        before = {n: {k: v.clone() for k, v in m.state_dict().items() if v.is_floating_point()}
                  for n, m in nets.items()}  # BatchNorm's step counters apart
        for part in stage.parts().values():
            if isinstance(part, nn.Module):
                part.cuda()
        stage.lpips.cuda()
        if compiled:
            stage.compile()
        logs = []
        for s in range(3):
            torch.manual_seed(s)
            out = stage.step(*(t.cuda() for t in _repae_batch(s)))
            logs.append(torch.stack(list(out.values())))
        updates = {}
        for name, m in nets.items():
            after = m.state_dict()
            assert before[name].keys() <= after.keys()  # compiled in place: the keys stay
            updates[name] = {k: after[k].double().cpu() - v.double()
                             for k, v in before[name].items()}
        results.append((torch.stack(logs).cpu(), updates))
    (eager, u_eager), (compiled, u_compiled) = results
    assert torch.allclose(compiled, eager, rtol=1e-3, atol=1e-4)  # losses, norms, logits
    for net in u_eager:
        diff = sum((u_compiled[net][k] - u_eager[net][k]).square().sum() for k in u_eager[net])
        size = sum(u.square().sum() for u in u_eager[net].values())
        worst = sorted(((u_compiled[net][k] - u_eager[net][k]).norm() / u.norm().clamp_min(1e-30),
                        k) for k, u in u_eager[net].items() if u.norm() > 0)[-3:]
        assert size > 0 and (diff / size).sqrt() < 1e-2, (net, worst)  # a frozen net: size 0


def test_repae_demo_reconstruction_and_alignment_improve():
    # 30 steps on 8 generated shapes (32 px) with a random encoder, LPIPS and discriminator, from a
    # random VAE whose posterior is narrow (as a pretrained one's): reconstruction and both
    # alignment losses (SiT pass, VAE pass) go down
    torch.manual_seed(0)
    x, y = data.generated_images(8, 32, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = encoders.load_encoder("dinov2-vit-s", 32, weights="random")(x)  # (8, 4, 384)
    vae = encoders.VAE(widths=(8, 16, 16, 16), layers=1, groups=4)
    with torch.no_grad():
        vae.quant_conv.bias[4:] = -8.0  # posterior std exp(-4)
    stage = repae.Stage(_tiny_sit(), align.ConvProjector(64, 384), vae,
                        repae.LPIPS(widths=(4, 8, 8, 8, 8)), repae.PatchGAN(ndf=8), align_depth=2,
                        gamma=0.6, coeff=1.0, lr=2e-3, vae_lr=5e-3, disc_lr=2e-4)
    logs = []
    for s in range(30):
        torch.manual_seed(s)
        logs.append({k: v.item() for k, v in stage.step(x, y, target).items()})
    last = {k: sum(d[k] for d in logs[-5:]) / 5 for k in logs[0]}
    assert last["rec"] < 0.75 * logs[0]["rec"], (logs[0], last)  # measured: 0.41 -> 0.23
    assert last["repa"] < logs[0]["repa"] - 0.4 and last["vae_align"] < logs[0]["vae_align"] - 0.4
    assert all(math.isfinite(v) for d in logs for v in d.values())


def test_repae_export_writes_what_load_vae_reads(tmp_path, monkeypatch, capsys):
    stage = _repae_stage(ema_decay=0.5)
    torch.manual_seed(0)
    stage.step(*_repae_batch(0))
    run = tmp_path / "run"
    state = {key: part.state_dict() for key, part in stage.parts().items()}
    data.save_checkpoint(dict(state, args={}, step=1),
                         str(run / "checkpoints" / "0000001.pt"))
    out, stats = tmp_path / "e2e-vae.pt", tmp_path / "e2e-vae-latents-stats.pt"
    monkeypatch.setattr(sys, "argv", ["repae.py", "export", "--ckpt", str(run), "--out", str(out)])
    runpy.run_path(repae.__file__, run_name="__main__")
    assert f"--vae-weights {out} --vae-stats {stats}" in capsys.readouterr().out
    made = out.read_bytes()
    with pytest.raises(SystemExit):  # a second export leaves the first as it is
        runpy.run_path(repae.__file__, run_name="__main__")
    assert "exists already" in capsys.readouterr().err and out.read_bytes() == made
    small = encoders.VAE
    monkeypatch.setattr(encoders, "VAE", lambda: small(widths=(8, 16, 16, 16), layers=1, groups=4))
    vae = encoders.load_vae(str(out), str(stats))  # train.py's and sample.py's loader, unchanged
    want = stage.vae.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in vae.state_dict().items())
    # official save_vae_weights.py: scale = rsqrt(EMA running var), bias = EMA running mean
    assert torch.equal(vae.latent_scale.flatten(), stage.ema_bn.running_var.rsqrt())
    assert torch.equal(vae.latent_shift.flatten(), stage.ema_bn.running_mean)
    assert not torch.equal(stage.ema_bn.running_var, stage.bn.running_var)
    z = torch.randn(2, 4, 4, 4)  # the live VAE's scale and shift follow the EMA BatchNorm
    live = stage.vae
    assert torch.equal(vae.decode(vae.unscale(z)), live.decode(live.unscale(z)))
    data.save_checkpoint(dict(model={}, args={}, step=1), str(tmp_path / "plain.pt"))
    monkeypatch.setattr(sys, "argv", ["repae.py", "export", "--ckpt", str(tmp_path / "plain.pt"),
                                      "--out", str(out)])
    with pytest.raises(SystemExit):
        runpy.run_path(repae.__file__, run_name="__main__")
    assert "is not a REPA-E checkpoint" in capsys.readouterr().err
    newest = run / "checkpoints" / "0000002.pt"  # a damaged newer one: the good one is named
    newest.write_bytes((run / "checkpoints" / "0000001.pt").read_bytes()[:5000])
    monkeypatch.setattr(sys, "argv", ["repae.py", "export", "--ckpt", str(run),
                                      "--out", str(tmp_path / "other.pt")])
    with pytest.raises(SystemExit):
        runpy.run_path(repae.__file__, run_name="__main__")
    good = run / "checkpoints" / "0000001.pt"
    assert f"the newest good one is {good}: pass --ckpt {good}" in capsys.readouterr().err


def test_repae_flags_and_build_refuse_what_cannot_run(tmp_path):
    p = data.Parser("train.py")
    repae.add_args(p)
    args = p.parse_args(["--repae", "--repae-vgg", "random", "--repae-lpips", "random"])
    assert (args.vae_lr, args.disc_lr, args.vae_align_coeff) == (1e-4, 1e-4, 1.5)
    assert args.repae_disc is None
    args.__dict__.update(vae_weights="vae.safetensors", encoder_depth=2, spnorm_gamma=0.6,
                         proj_coeff=0.7, lr=1e-4, ema=(0.9999, 0.999),
                         precision="fp32")  # train.py's own flags
    stage = _repae_stage()
    with pytest.warns(UserWarning, match="RANDOM"):
        built = repae.build(args, stage.net, stage.proj, stage.vae)
    assert built.decay == 0.9999 and built.vae_coeff == 1.5
    assert (built.gamma, built.coeff, built.depth) == (0.6, 0.7, 2)  # each where its flag says
    assert built.vae.training and all(q.requires_grad for q in built.vae.parameters())
    stage.vae.encoder = None
    with pytest.raises(RuntimeError, match="--vae-weights vae.safetensors is a decoder-only"):
        repae.build(args, stage.net, stage.proj, stage.vae)


def test_repae_bf16_autocast_step_stays_close_to_fp32():
    # train.py passes its autocast: the VAE and SiT passes run in bf16, the losses in fp32
    got = []
    for amp in (None, torch.autocast("cpu", dtype=torch.bfloat16)):
        stage = _repae_stage(amp=amp)
        torch.manual_seed(0)
        got.append(stage.step(*_repae_batch(0)))
    for k in ("loss", "vae_loss", "rec", "kl", "d_loss"):
        assert abs(got[1][k] - got[0][k]) <= 0.02 * abs(got[0][k]), k


# train.py --repae and sample.py on its checkpoints: SiT-S/2's name on a tiny SiT, a small SD-VAE,
# LPIPS and PatchGAN (random), a random DINOv2-S; 8 generated shapes at 32 px
_REPAE_SIT = ["--model", "SiT-S/2", "--image-size", "32", "--vae-weights", "random",
              "--encoder", "dinov2-vit-s", "--encoder-weights", "random",
              "--irepa", "--encoder-depth", "2",
              "--batch-size", "8", "--num-generated", "8", "--lr", "2e-3",
              "--log-every", "1", "--sample-every", "0", "--no-compile"]
_REPAE = [*_REPAE_SIT, "--repae", "--repae-vgg", "random", "--repae-lpips", "random",
          "--vae-lr", "5e-3", "--disc-lr", "2e-4"]


def _repae_tiny(monkeypatch):
    sit, vae, lpips, disc = model.SiT, encoders.VAE, repae.LPIPS, repae.PatchGAN

    def small_vae():
        v = vae(widths=(8, 16, 16, 16), layers=1, groups=4)
        with torch.no_grad():
            v.quant_conv.bias[4:] = -8.0  # posterior std exp(-4): narrow, as a pretrained one's
        return v
    monkeypatch.setitem(model.models, "SiT-S/2", lambda image_size, num_classes, **kw:
                        sit(image_size, 2, 64, 4, 4, num_classes=num_classes, **kw))
    monkeypatch.setattr(encoders, "VAE", small_vae)
    monkeypatch.setattr(repae, "LPIPS", lambda: lpips((4, 8, 8, 8, 8)))
    monkeypatch.setattr(repae, "PatchGAN", lambda: disc(ndf=8))


def _repae_ck(run, step):
    return data.read_weights(str(run / "checkpoints" / f"{step:07d}.pt"), "--ckpt")


def test_repae_train_run_improves_and_checkpoints_the_stage(tmp_path, monkeypatch, cpu_only):
    # python train.py --repae ...: the VAE's reconstruction and both alignment losses go down
    _repae_tiny(monkeypatch)
    train.main([*_REPAE, "--steps", "30", "--ckpt-every", "30", "--sample-every", "30",
                "--out-dir", str(tmp_path)])
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert len(log) == 30 and all(math.isfinite(r[k]) for r in log for k in repae.LOGGED)
    last = {k: sum(r[k] for r in log[-5:]) / 5 for k in repae.LOGGED}
    assert last["rec"] < 0.75 * log[0]["rec"], (log[0], last)  # 0.41 -> 0.27
    assert last["repa"] < log[0]["repa"] - 0.4  # measured: 0.00 -> -0.61
    assert last["vae_align"] < log[0]["vae_align"] - 0.4  # -0.00 -> -0.63
    ck = _repae_ck(tmp_path, 30)
    assert set(ck) == {"model", "proj", "ema", "bn", "ema_bn", "vae", "discriminator", "opt",
                       "opt_vae", "opt_disc", "args", "step"}
    assert ck["args"]["repae"] and ck["bn"]["num_batches_tracked"] == 30
    assert (tmp_path / "samples" / "0000030.png").exists()  # decoded by the tuned VAE
    # the curves: SiT's loss, denoising, alignment; the VAE's reconstruction, LPIPS, alignment
    # and the discriminator's loss
    assert Image.open(tmp_path / "curves.png").size == (640, 7 * 160)


def test_repae_train_resume_is_bit_exact(tmp_path, monkeypatch, cpu_only, capsys):
    # 2 steps, then --resume to 4 == 4 steps at once: SiT, EMA, VAE, BatchNorms, discriminator,
    # the three optimisers and the log
    _repae_tiny(monkeypatch)
    dirs = [tmp_path / "whole", tmp_path / "part"]
    train.main([*_REPAE, "--steps", "4", "--ckpt-every", "2", "--out-dir", str(dirs[0])])
    train.main([*_REPAE, "--steps", "2", "--ckpt-every", "2", "--out-dir", str(dirs[1])])
    train.main(["--resume", str(dirs[1]), "--steps", "4"])
    a, b = (_repae_ck(r, 4) for r in dirs)
    assert a.pop("args")["out_dir"] == str(dirs[0]) and b.pop("args")["resume"]
    differ, leaves = _repae_differ(a, b)
    assert not differ and leaves > 100 and "vae" in a, differ
    logs = [[json.loads(line) for line in open(r / "log.jsonl")] for r in dirs]
    for log in logs:
        for rec in log:
            rec.pop("img_s_per_gpu")
    assert logs[0] == logs[1] and len(logs[0]) == 4
    with pytest.raises(SystemExit):  # the lrs live in the optimisers' states
        train.main(["--resume", str(dirs[1]), "--vae-lr", "1", "--steps", "6"])
    assert "--vae-lr 1.0 differs" in capsys.readouterr().err


def test_repae_sample_decodes_with_the_runs_own_vae(tmp_path, monkeypatch, cpu_only):
    # the run's --vae-weights is random; sample.py decodes with the tuned VAE it saved, scaled by
    # its EMA BatchNorm, unasked
    _repae_tiny(monkeypatch)
    run = tmp_path / "run"
    train.main([*_REPAE, "--steps", "2", "--ckpt-every", "2", "--out-dir", str(run)])
    used, generate = [], sample.generate
    monkeypatch.setattr(sample, "generate", lambda net, y, family, vae, *a, **kw:
                        used.append(vae) or generate(net, y, family, vae, *a, **kw))
    sample.main(["--ckpt", str(run), "--num-steps", "2", "--num-samples", "4", "--out",
                 str(tmp_path / "s.npz")])
    ck = _repae_ck(run, 2)
    vae = used[0]
    assert not _repae_differ(vae.state_dict(), ck["vae"])[0]
    assert torch.equal(vae.latent_scale.flatten(), ck["ema_bn"]["running_var"].rsqrt())
    assert torch.equal(vae.latent_shift.flatten(), ck["ema_bn"]["running_mean"])
    torch.manual_seed(0)  # sample.py's seed: the VAE --vae-weights random would give
    fresh = encoders.load_vae("random").state_dict()
    assert _repae_differ(fresh, ck["vae"])[0]
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (4, 32, 32, 3)
    sample.main(["--ckpt", str(run), "--num-steps", "2", "--num-samples", "4", "--out",
                 str(tmp_path / "t.npz"), "--vae-weights", "random"])  # a flag wins, as always
    assert not _repae_differ(used[1].state_dict(), fresh)[0]
    # an official REPA-E checkpoint keeps the latent BatchNorm inside the SiT, as bn.*
    bn = {f"bn.{k}": v for k, v in ck["ema_bn"].items()}
    official = dict(ema={**ck["ema"], **bn}, model=ck["model"], vae=ck["vae"], args=ck["args"])
    torch.save(official, tmp_path / "official.pt")
    sample.main(["--ckpt", str(tmp_path / "official.pt"), "--num-steps", "2", "--num-samples",
                 "4", "--out", str(tmp_path / "u.npz")])
    assert torch.equal(used[2].latent_scale, vae.latent_scale)
    images = [np.load(tmp_path / f"{name}.npz")["arr_0"] for name in ("s", "u")]
    assert np.array_equal(*images)


def test_repae_exported_vae_trains_a_plain_run(tmp_path, monkeypatch, cpu_only, capsys):
    # repae.export's files as --vae-weights and --vae-stats: a plain iREPA run on E2E-VAE latents
    _repae_tiny(monkeypatch)
    run, plain = tmp_path / "run", tmp_path / "plain"
    train.main([*_REPAE, "--steps", "1", "--ckpt-every", "1", "--out-dir", str(run)])
    stats = repae.export(str(run), str(tmp_path / "e2e-vae.pt"))
    seen, posterior = [], train.posterior
    monkeypatch.setattr(train, "posterior", lambda vae, *a: seen.append(vae) or posterior(vae, *a))
    train.main([*_REPAE_SIT, "--vae-weights", str(tmp_path / "e2e-vae.pt"), "--vae-stats", stats,
                "--steps", "1", "--ckpt-every", "1", "--out-dir", str(plain)])
    ck = _repae_ck(run, 1)
    assert not _repae_differ(seen[0].state_dict(), ck["vae"])[0]
    assert torch.equal(seen[0].latent_scale.flatten(), ck["ema_bn"]["running_var"].rsqrt())
    assert "vae" not in _repae_ck(plain, 1)
    with pytest.raises(SystemExit):  # a plain run does not turn into a REPA-E one on resume
        train.main(["--resume", str(plain), "--repae", "--steps", "2"])
    assert "--repae True differs from the run's False" in capsys.readouterr().err


def test_repae_train_refuses_what_cannot_run_before_any_work(tmp_path, monkeypatch):
    _repae_tiny(monkeypatch)
    out = ["--steps", "1", "--out-dir", str(tmp_path / "r")]
    flow = "--repae trains SiT-*/N (flow) with an --encoder"
    for argv, want in [([*_REPAE, "--encoder", "none"], flow),
                       ([*_REPAE, "--model", "JiT-demo/16"], flow),
                       ([*_REPAE, "--objective", "meanflow"], flow),
                       ([*_REPAE_SIT, "--repae"], "--repae-vgg and --repae-lpips")]:
        with pytest.raises(SystemExit) as e:
            train.main([*argv, *out])
        _one_line(str(e.value), "--repae", want)
    assert not (tmp_path / "r").exists()
    decoder = {k: v for k, v in encoders.VAE().state_dict().items() if k.startswith("decoder.")}
    torch.save({**decoder, **nn.Conv2d(4, 4, 1).state_dict(prefix="post_quant_conv.")},
               tmp_path / "decoder.pt")
    with pytest.raises(SystemExit) as e:  # found on building, before any step
        train.main([*_REPAE, *out, "--vae-weights", str(tmp_path / "decoder.pt")])
    _one_line(str(e.value), "--vae-weights", "is a decoder-only file")


# =============================================================================
# weights files, checkpoint checksums and progress bars (issue 33: what a new user trips on)

import struct  # noqa: E402
import zipfile  # noqa: E402


def _weights_files(tmp_path, shapes, key):
    # (junk, wrong keys, key's shape wrong) weights files; shapes: the module's state-dict shapes
    tmp_path.mkdir()
    (tmp_path / "junk.pth").write_text("not weights")
    torch.save({"nope": torch.zeros(3)}, tmp_path / "keys.pth")
    fake = {k: torch.zeros(()).expand(s) for k, s in shapes.items()}  # stride 0: a tiny file
    torch.save({**fake, key: torch.zeros(5, 3)}, tmp_path / "shape.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    return [(tmp_path / "junk.pth", "junk.pth: not a file torch can read as weights"),
            (tmp_path / "tensor.pth", "tensor.pth: holds a Tensor, not named tensors"),
            (tmp_path / "keys.pth", "keys.pth does not fit: missing key "),
            (tmp_path / "shape.pth", f"shape.pth does not fit: {key} is [5, 3] in the file, "
                                     f"{list(shapes[key])} expected")]


def _one_line(text, flag, want):
    # a careless file as users see it: one line naming the flag and the file, never torch's advice
    assert "Traceback" not in text and "weights_only" not in text, text
    assert len(text.strip().splitlines()) == 1 and f"{flag} " in text and want in text, text


def test_weights_file_unreadable_or_unfit_is_one_line_naming_flag_and_file(tmp_path, capsys,
                                                                           cpu_only):
    with warnings.catch_warnings(), torch.device("meta"):  # the shapes only
        warnings.simplefilter("ignore")
        enc = encoders.load_encoder("dinov2-vit-s", 32, "random").model.state_dict()
        vae = encoders.VAE().state_dict()
        inception = fid.FIDInception().state_dict()
    qkv = "blocks.0.attn.qkv.weight"
    for path, want in _weights_files(tmp_path / "enc", {k: v.shape for k, v in enc.items()}, qkv):
        with pytest.raises(SystemExit) as e:
            train.main([*_TINY, "--steps", "1", "--encoder", "dinov2-vit-s",
                        "--encoder-weights", str(path), "--out-dir", str(tmp_path / "run")])
        _one_line(str(e.value), "--encoder-weights", want)
        with pytest.raises(SystemExit):
            metrics.main(["--encoder", "dinov2-vit-s", "--encoder-weights", str(path),
                          "--num-images", "2"])
        _one_line(capsys.readouterr().err, "--encoder-weights", want)
    conv = "decoder.conv_in.weight"
    for path, want in _weights_files(tmp_path / "vae", {k: v.shape for k, v in vae.items()}, conv):
        with pytest.raises(SystemExit) as e:
            train.main([*_TINY, "--steps", "1", "--model", "SiT-S/2", "--vae-weights", str(path),
                        "--out-dir", str(tmp_path / "run")])
        _one_line(str(e.value), "--vae-weights", want)
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    for path, want in _weights_files(tmp_path / "inc",
                                     {k: v.shape for k, v in inception.items()}, "fc.weight"):
        if path.name == "tensor.pth":  # fid.py stands alone: its own loader's words
            want = "tensor.pth does not fit: missing key "
        with pytest.raises(SystemExit), pytest.warns(UserWarning, match="4 images"):
            fid.main([str(tmp_path / "s.npz"), "--inception", str(path)])
        _one_line(capsys.readouterr().err, "--inception", want)
    assert not (tmp_path / "run").exists()


def _flip_inside_largest_tensor(path):
    # 64 bytes inverted in the middle of the largest tensor's data:
    # the zip and the pickle still read
    with zipfile.ZipFile(path) as z:
        record = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset)
        start = record.header_offset + 30 + sum(struct.unpack("<HH", f.read(30)[26:30]))
        f.seek(start + record.file_size // 2)
        flipped = bytes(b ^ 0xFF for b in f.read(64))
        f.seek(start + record.file_size // 2)
        f.write(flipped)


def test_checkpoint_damaged_inside_is_refused_and_the_newest_good_one_named(tmp_path, capsys):
    run = tmp_path / "run"
    train.main([*_TINY, "--steps", "4", "--ckpt-every", "2", "--out-dir", str(run)])
    newest, good = run / "checkpoints" / "0000004.pt", run / "checkpoints" / "0000002.pt"
    _flip_inside_largest_tensor(newest)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.main(["--resume", str(run), "--steps", "6"])
    err = capsys.readouterr().err
    assert (f"{newest} is not a readable" in err
            and f"the newest good one is {good}: pass --resume {good}" in err)
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(newest), "--out", str(tmp_path / "s.png")])
    _one_line(capsys.readouterr().err, "--ckpt",
              f"{newest}: damaged: its contents differ from their checksum")


def test_progress_moves_each_sampling_step_and_while_preparing(tmp_path, monkeypatch, capsys,
                                                               cpu_only):
    sample.main(["--ckpt", _sample_ckpt(tmp_path), "--num-steps", "3", "--num-samples", "2",
                 "--out", str(tmp_path / "s.png")])
    err = capsys.readouterr().err  # a bar of the steps under the bar of the shards, gone when done
    assert "sampling steps:   0%| " in err and "| 0/3 [" in err
    real = train.generate  # the training grid: the same bar, over 2 steps here (50 in a run)
    monkeypatch.setattr(train, "generate", lambda *a, **k: real(*a, **{**k, "num_steps": 2}))
    train.main([*_TINY, "--steps", "1", "--sample-every", "1", "--out-dir", str(tmp_path / "run")])
    assert "sampling steps:   0%| " in capsys.readouterr().err
    for i in range(3):
        os.makedirs(tmp_path / "data" / f"c{i}")
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(
            tmp_path / "data" / f"c{i}" / "a.png")
    (tmp_path / "data" / "c2" / "b.png").write_bytes(b"not an image")  # skipped: a copy
    data.prepare(str(tmp_path / "data"), str(tmp_path / "prep"), 32, None, None, "cpu")
    assert "writing images.npy" in capsys.readouterr().err
    assert np.load(tmp_path / "prep" / "images.npy").shape == (3, 3, 32, 32)
    assert sorted(os.listdir(tmp_path / "prep")) == ["images.npy", "labels.npy", "meta.json"]


def _repae_ddp_worker(rank, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _repae_tiny(pytest.MonkeyPatch())
    torch.distributed.init_process_group("gloo")
    z = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 3 + 1  # both ranks
    bn = nn.BatchNorm2d(4, eps=1e-4, affine=False)
    zn = repae.batch_norm(bn, z[rank * 4:rank * 4 + 4])  # this rank's half of the global batch
    torch.save(dict(zn=zn, mean=bn.running_mean, var=bn.running_var),
               os.path.join(out, f"bn{rank}.pt"))
    torch.distributed.destroy_process_group()
    sys.stdout = open(os.path.join(out, f"rank{rank}.txt"), "w")
    train.main([*_REPAE, "--steps", "4", "--ckpt-every", "4",
                "--out-dir", os.path.join(out, "run")])
    sys.stdout.close()


def test_repae_runs_under_torchrun_as_ddp_would(tmp_path, monkeypatch):
    # torchrun --nproc_per_node=2 train.py --repae: gradients averaged over the ranks and the
    # latent BatchNorm's statistics those of the global batch (the official's DDP + SyncBN)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    torch.multiprocessing.spawn(_repae_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    assert "replicas identical across 2 ranks: True" in open(tmp_path / "rank0.txt").read()
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["0000004.pt"]
    z = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 3 + 1
    bn = nn.BatchNorm2d(4, eps=1e-4, affine=False)
    whole = bn(z)  # one process, the whole batch: torch's own BatchNorm
    for rank in range(2):
        got = torch.load(tmp_path / f"bn{rank}.pt")
        assert torch.allclose(got["zn"], whole[rank * 4:rank * 4 + 4], atol=1e-5)
        assert torch.allclose(got["mean"], bn.running_mean, atol=1e-6)
        assert torch.allclose(got["var"], bn.running_var, atol=1e-5)
