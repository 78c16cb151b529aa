"""
The whole test suite, grouped by file. CPU, fixed seeds, small shapes; GPU-only tests skip cleanly.

    python -m pytest -q test_all.py
"""
import math
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(2)

import align  # noqa: E402
import model  # noqa: E402

# =============================================================================
# model.py


def _tiny_sit(image_size=32, **kw):
    return model.SiT(image_size=image_size, patch_size=2, hidden_size=64, depth=4, num_heads=4, num_classes=10, **kw)


def _tiny_jit(image_size=32, in_context_start=2, **kw):
    return model.JiT(image_size=image_size, patch_size=4, hidden_size=64, depth=4, num_heads=4, bottleneck=16,
                     in_context_len=4, in_context_start=in_context_start, num_classes=10, **kw)


def _randomize(m, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return m


@pytest.mark.parametrize("name,count", [
    ("SiT-B/2", 130_303_504), ("SiT-L/2", 457_824_272), ("SiT-XL/2", 674_816_272), ("JiT-B/16", 131_123_712),
    ("JiT-L/16", 458_877_664), ("JiT-H/16", 952_514_368), ("JiT-B/32", 133_190_400)])
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


@pytest.mark.parametrize("name,res", [("SiT-B/2", 256), ("SiT-B/2", 512), ("SiT-XL/2", 256), ("JiT-B/16", 256),
                                      ("JiT-B/16", 512), ("JiT-B/32", 512), ("JiT-H/16", 256)])
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
    # class tokens enter before block 2 (index 2); hidden tokens must be the 64 patch tokens either way,
    # and equal to what the blocks computed for those positions.
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


def test_model_jit_class_tokens_condition_the_output():
    # the in-context class tokens are dropped before the final layer, so they can reach the output
    # only through attention: the gradient to their learned positions must be non-zero
    torch.manual_seed(0)
    m = _randomize(_tiny_jit(), std=0.3).eval()
    m(torch.randn(1, 3, 32, 32), torch.rand(1), torch.tensor([1]))[0].square().sum().backward()
    assert m.in_context_posemb.grad.abs().sum() > 0


def test_model_rope_rotates_pairs_by_position():
    cos, sin = model.rope_tables(head_dim=8, grid=4, prefix=2)
    assert cos.shape == (18, 8) and torch.all(cos[:2] == 1) and torch.all(sin[:2] == 0)
    # token (row 1, col 0): first half of dims rotates with the row (angle 1 * freq), second half not at all
    tok = 2 + 1 * 4 + 0
    assert torch.allclose(cos[tok, :4], torch.cos(torch.tensor([1.0, 1.0, 0.01, 0.01])), atol=1e-6)
    assert torch.allclose(cos[tok, 4:], torch.ones(4))
    # rotating by the table preserves norms (a rotation)
    x = torch.randn(1, 1, 18, 8)
    assert torch.allclose(model.apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_model_sincos_pos_embed_matches_formula():
    pe = model.sincos_pos_embed(8, 3)  # omega = [1, 1e-2]
    r, c = 2, 1
    row = pe[r * 3 + c]
    expect = torch.tensor([math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100),
                           math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100)])
    assert torch.allclose(row, expect, atol=1e-6)


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
    for k in ["x_embedder.proj.weight", "pos_embed", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight",
              "blocks.0.attn.qkv.bias", "blocks.0.mlp.fc1.weight", "blocks.0.adaLN_modulation.1.weight",
              "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias"]:
        assert k in keys
    keys = set(_tiny_jit().state_dict())
    for k in ["x_embedder.proj1.weight", "x_embedder.proj2.bias", "in_context_posemb", "blocks.0.attn.q_norm.weight",
              "blocks.0.mlp.w12.weight", "blocks.0.mlp.w3.bias", "blocks.0.norm1.weight", "final_layer.norm_final.weight"]:
        assert k in keys
    assert not any("rope" in k for k in keys)  # RoPE tables are derived, not stored (as the official)


def test_model_sit_small_size_works():
    # the official SiT-S builds its final layer 768 wide and crashes; ours runs
    with torch.device("meta"):
        m = model.build_model("SiT-S/2")
        out, _ = m(torch.empty(1, 4, 32, 32), torch.rand(1), torch.zeros(1, dtype=torch.long))
    assert out.shape == (1, 4, 32, 32)

# =============================================================================
# align.py


def test_align_projector_sizes():
    assert sum(p.numel() for p in align.make_projector(768, 768, conv=True).parameters()) == 5_309_184
    assert sum(p.numel() for p in align.make_projector(768, 768, conv=False).parameters()) == 7_344_896


def test_align_conv_projector_keeps_grid_and_is_local():
    torch.manual_seed(0)
    p = align.make_projector(8, 5, conv=True)
    h = torch.randn(2, 16, 8)
    out = p(h)
    assert out.shape == (2, 16, 5)
    # token (0,0) sees only its 3x3 neighbourhood: changing token (3,3) leaves it alone, (1,1) does not
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


def test_align_conv_projector_rejects_non_square_grid():
    with pytest.raises(ValueError, match="square token grid"):
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
    assert torch.allclose(out.mean(1, keepdim=True) * std, (1 - gamma) * z.mean(1, keepdim=True), atol=1e-4)


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
    assert [align.encoder_depth_default(n) for n in ("SiT-B/2", "SiT-XL/2", "JiT-B/16", "JiT-L/16")] == [4, 8, 4, 8]


def test_align_grep_prints_the_change():
    src = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "align.py")).read()
    tagged = [line for line in src.splitlines() if "iREPA" in line and not line.lstrip().startswith(("#", '"'))]
    assert any("Conv2d" in line for line in tagged) and any("gamma * z.mean" in line for line in tagged)


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
