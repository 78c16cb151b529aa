"""
The whole test suite, grouped by file. CPU, fixed seeds, small shapes; GPU-only tests skip cleanly.

    python -m pytest -q test_all.py
"""
import json
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

# =============================================================================
# train.py

import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import train  # noqa: E402

_ROOT = os.path.dirname(os.path.abspath(__file__))
# a tiny, fast run: the demo JiT at 32 px (2x2 tokens), 8 images per step, no sample grids
_TINY = ["--model", "JiT-demo/16", "--image-size", "32", "--batch-size", "8", "--num-generated", "64",
         "--log-every", "2", "--sample-every", "0", "--lr", "1e-3", "--warmup-steps", "2"]


def _train_cmd(*extra):
    return [sys.executable, os.path.join(_ROOT, "train.py"), *_TINY, *extra]


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_train_generated_images_deterministic_and_class_coloured():
    a, la = train.generated_images(20, 32, seed=3)
    b, lb = train.generated_images(20, 32, seed=3)
    assert a.dtype == torch.uint8 and a.shape == (20, 3, 32, 32) and torch.equal(a, b) and torch.equal(la, lb)
    assert sorted(set(la.tolist())) == list(range(train.NUM_GENERATED_CLASSES))
    # each class has its own colour: the most saturated pixels of a red-class image are red
    red = a[la == 0].float()
    assert (red[:, 0] - red[:, 2]).amax(dim=(1, 2)).min() > 100


def test_train_center_crop_is_adm():
    from PIL import Image
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 700, 3), dtype=np.uint8))
    out = train.center_crop(img, 64)
    assert out.shape == (64, 64, 3)
    # reference: two box halvings (700x300 -> 350x150 -> 175x75), bicubic to short side 64, center crop
    ref = img.resize((350, 150), Image.BOX).resize((175, 75), Image.BOX)
    ref = np.asarray(ref.resize((round(175 * 64 / 75), 64), Image.BICUBIC))
    x0 = (ref.shape[1] - 64) // 2
    assert np.array_equal(out, ref[:, x0:x0 + 64])


def test_train_resume_after_sigkill_is_bitwise_identical(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd("--steps", "12", "--ckpt-every", "2", "--out-dir", str(full)), check=True,
                   capture_output=True)
    proc = subprocess.Popen(_train_cmd("--steps", "12", "--ckpt-every", "2", "--out-dir", str(killed)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "0000002.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(os.listdir(killed / "checkpoints"))
    assert "0000012.pt" not in done, "the run finished before it could be killed"
    subprocess.run(_train_cmd("--resume", str(killed)), check=True, capture_output=True)
    a, b = _state(full / "checkpoints" / "0000012.pt"), _state(killed / "checkpoints" / "0000012.pt")
    for key in ("model", "ema", "ema2"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    la = [json.loads(line) for line in open(full / "log.jsonl")]
    lb = [json.loads(line) for line in open(killed / "log.jsonl")]
    assert [r["loss"] for r in la][-4:] == [r["loss"] for r in lb][-4:]


def test_train_checkpoint_write_killed_leaves_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoints" / "0000001.pt")
    train.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def dying_save(obj, f):
        open(f, "wb").write(b"half a checkp")
        raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(_state(path)["w"], torch.ones(3))
    assert train.find_checkpoint(str(tmp_path)) == path  # the .tmp leftover is never picked up


def test_train_ddp_gloo_two_processes(tmp_path):
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                        os.path.join(_ROOT, "train.py"), *_TINY, "--steps", "6", "--ckpt-every", "6",
                        "--out-dir", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "replicas identical across 2 ranks: True" in r.stdout
    assert os.listdir(out / "checkpoints") == ["0000006.pt"]
    assert len(open(out / "log.jsonl").readlines()) == 3


def test_train_ddp_batch_not_divisible(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518",
                        os.path.join(_ROOT, "train.py"), *_TINY, "--batch-size", "7", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
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
    assert all(torch.isfinite(v).all() for v in _state(tmp_path / "checkpoints" / "0000004.pt")["model"].values())


def test_train_image_folder_with_corrupt_file(tmp_path, capsys):
    from PIL import Image
    imgs, labels = train.generated_images(16, 40, seed=0)
    for i, (im, k) in enumerate(zip(imgs, labels)):
        os.makedirs(tmp_path / "data" / f"class{k.item() % 2}", exist_ok=True)
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / "data" / f"class{k.item() % 2}" / f"{i}.png")
    bad = tmp_path / "data" / "class1" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    train.main([*_TINY, "--data-path", str(tmp_path / "data"), "--num-classes", "2", "--steps", "2",
                "--ckpt-every", "2", "--num-workers", "0", "--out-dir", str(tmp_path / "run"),
                "--prepared-dir", str(tmp_path / "prep")])
    assert str(bad) in capsys.readouterr().err
    assert np.load(tmp_path / "prep" / "images.npy").shape == (16, 3, 32, 32)
    assert os.path.exists(tmp_path / "run" / "checkpoints" / "0000002.pt")


@pytest.mark.parametrize("argv,msg", [
    (["--model", "SiT-Q/2"], "unknown model"),
    (["--encoder", "dinov9"], "unknown encoder"),
    (["--model", "JiT-B/32", "--image-size", "256", "--encoder", "dinov2-vit-b"], "8x8 token grid"),
    (["--data-path", "/does/not/exist"], "does not exist"),
])
def test_train_bad_input_fails_before_training(argv, msg, tmp_path):
    with pytest.raises((SystemExit, ValueError), match=msg):
        train.main([*argv, "--out-dir", str(tmp_path), "--steps", "1"])
    assert not os.path.exists(tmp_path / "checkpoints")


def test_train_sample_grid_written(tmp_path):
    train.main([*_TINY, "--steps", "2", "--ckpt-every", "2", "--sample-every", "2", "--out-dir", str(tmp_path)])
    from PIL import Image
    assert Image.open(tmp_path / "samples" / "0000002.png").size == (8 * 32, 8 * 32)
