"""Frozen target encoders (all through timm) and the SD-VAE (sd-vae-ft-mse), for REPA / iREPA.

Encoders reproduce the official iREPA preprocessing and token choice (README, "Encoders and metrics"); the VAE
is a plain-torch AutoencoderKL whose keys follow diffusers, so the hub file loads strictly.
"""
import contextlib
import os
import re
import socket
import warnings
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import timm
except RuntimeError as err:  # e.g. "operator torchvision::nms does not exist"
    raise ImportError(f"timm cannot import torchvision ({err}): this torchvision wheel does not match the installed "
                      "torch (PyPI's torchvision needs PyPI's CUDA torch, not a +cpu build). Install both from "
                      "requirements.txt into a fresh venv, as the README's quick start does.") from err
from timm.layers import resample_abs_pos_embed

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _e(timm_id, px, mode="bicubic", norm_first=True, stats=IMAGENET, prenorm=False, kw=None):
    # px: input side for 256 px images (scaled by R/256). mode: resize interpolation (never antialiased).
    # norm_first: the official code normalises before resizing. prenorm: tokens are taken before the final norm.
    return dict(timm_id=timm_id, px=px, mode=mode, norm_first=norm_first, stats=stats, prenorm=prenorm, kw=kw or {})


def _webssl(dim, depth, heads):
    # DINOv2-style SwiGLU with hidden (int(4d*2/3)+7)//8*8, packed in one fc1 of twice that width; +0.5: exact int()
    hidden = 2 * ((int(dim * 4 * 2 / 3) + 7) // 8 * 8)
    return _e("vit_giant_patch14_dinov2", 224, kw=dict(embed_dim=dim, depth=depth, num_heads=heads,
                                                       mlp_ratio=(hidden + 0.5) / dim))


GELU_TANH = dict(act_layer="gelu_tanh")  # HF SigLIP uses tanh-GELU; some timm SigLIP defs default to erf-GELU
SIZE = dict(s="small", b="base", l="large", h="huge", g="giant")
ENCODERS = {
    **{f"dinov2-vit-{s}": _e(f"vit_{SIZE[s]}_patch14_dinov2.lvd142m", 224) for s in "sblg"},
    **{f"dinov2reg-vit-{s}": _e(f"vit_{SIZE[s]}_patch14_reg4_dinov2.lvd142m", 224) for s in "sblg"},
    # official: torchvision Resize (bilinear, antialias) to R itself, i.e. never resizes; then normalise
    "dinov3-vit-s16": _e("vit_small_patch16_dinov3_qkvb.lvd1689m", 256, "bilinear", False),
    "dinov3-vit-s16plus": _e("vit_small_plus_patch16_dinov3_qkvb.lvd1689m", 256, "bilinear", False),
    "dinov3-vit-b16": _e("vit_base_patch16_dinov3_qkvb.lvd1689m", 256, "bilinear", False),
    "dinov3-vit-l16": _e("vit_large_patch16_dinov3_qkvb.lvd1689m", 256, "bilinear", False),
    "dinov3-vit-h16plus": _e("vit_huge_plus_patch16_dinov3_qkvb.lvd1689m", 256, "bilinear", False),
    "dinov3-vit-7b16": _e("vit_7b_patch16_dinov3.lvd1689m", 256, "bilinear", False),
    **{f"dino-vit-{s}": _e(f"vit_{SIZE[s]}_patch16_224.dino", 256) for s in "sb"},
    "clip-vit-L": _e("vit_large_patch14_clip_quickgelu_224.openai", 224, norm_first=False, stats=CLIP, prenorm=True),
    "mae-vit-l": _e("vit_large_patch16_224.mae", 256, prenorm=True),
    "jepa-vit-h": _e("vit_huge_patch14_gap_224.in1k_ijepa", 224),
    # no timm weights: the official checkpoint files, renamed (mocov3 vit-{b,l}-300ep.pth.tar, HF facebook/webssl-*)
    **{f"mocov3-vit-{s}": _e(f"vit_{SIZE[s]}_patch16_224", 256) for s in "bl"},
    "webssl-vit-dino300m_full2b_224": _webssl(1024, 24, 16),
    "webssl-vit-dino1b_full2b_224": _webssl(1536, 40, 24),
    "webssl-vit-dino2b_full2b_224": _webssl(2688, 24, 21),
    "webssl-vit-dino3b_full2b_224": _webssl(3072, 26, 24),
    "webssl-vit-dino5b_full2b_224": _webssl(3584, 32, 28),
    "webssl-vit-dino7b_full8b_224": _webssl(4096, 32, 32),
    # official feeds SigLIP ImageNet mean/std (not SigLIP's 0.5)
    **{f"siglip-vit-{s}": _e(f"vit_{SIZE[s]}_patch16_siglip_256.webli", 256, kw=GELU_TANH) for s in "bl"},
    "siglip-vit-so400m": _e("vit_so400m_patch14_siglip_224.webli", 224, kw=GELU_TANH),
    **{f"siglip2-vit-{s}": _e(f"vit_{SIZE[s]}_patch16_siglip_256.v2_webli", 256, kw=GELU_TANH) for s in "bl"},
    "siglip2-vit-so400m": _e("vit_so400m_patch16_siglip_256.v2_webli", 256, kw=GELU_TANH),
    "siglip2-vit-g": _e("vit_giantopt_patch16_siglip_256.v2_webli", 256, kw=GELU_TANH),
    "pe-vit-t": _e("vit_pe_core_tiny_patch16_384.fb", 256, "bilinear", False, HALF, True),
    "pe-vit-s": _e("vit_pe_core_small_patch16_384.fb", 256, "bilinear", False, HALF, True),
    "pe-vit-b": _e("vit_pe_core_base_patch16_224.fb", 256, "bilinear", False, HALF, True),
    "pe-vit-l": _e("vit_pe_core_large_patch14_336.fb", 224, "bilinear", False, HALF, True),
    "pe-vit-g": _e("vit_pe_core_gigantic_patch14_448.fb", 224, "bilinear", False, HALF, True),
    "spatialpe-vit-b": _e("vit_pe_spatial_base_patch16_512.fb", 256, "bilinear", False, HALF, True),
    "spatialpe-vit-l": _e("vit_pe_spatial_large_patch14_448.fb", 224, "bilinear", False, HALF, True),
    "spatialpe-vit-g": _e("vit_pe_spatial_gigantic_patch14_448.fb", 224, "bilinear", False, HALF, True),
    "langpe-vit-l": _e("vit_pe_lang_large_patch14_448.fb", 224, "bilinear", False, HALF, True),
    "langpe-vit-g": _e("vit_pe_lang_gigantic_patch14_448.fb", 224, "bilinear", False, HALF, True),
    # Hiera has stride 32: fed 2R, its last stage is the (R/16)^2 grid
    "sam2-vit-s": _e("sam2_hiera_small.fb_r896", 512, norm_first=False),
    "sam2-vit-b": _e("sam2_hiera_base_plus.fb_r896", 512, norm_first=False),
    "sam2-vit-l": _e("sam2_hiera_large.fb_r1024", 512, norm_first=False),
    # the RADIO model normalises inside (CLIP mean/std) after the official bilinear resize to R, a no-op
    **{f"cradio-vit-{s}": _e(f"vit_{SIZE[s]}_patch16_radio_v3.c_radio", 256, "bilinear", False, CLIP) for s in "blhg"},
}


def _weights_file(what, flag, repo, files):
    """Hub `repo`'s first file of `files` (repo None: the URL files[0], kept where timm keeps URL weights), cached,
    else downloaded. Offline it fails within seconds (one socket probe, not huggingface_hub's ~25 s of retries)."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import RemoteEntryNotFoundError
    if repo is None:
        url, path = files[0], os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(files[0]))
        cached = path if os.path.isfile(path) else None
    else:
        url = constants.ENDPOINT
        cached = next((p for f in files if isinstance(p := try_to_load_from_cache(repo, f), str)), None)
    if cached:
        return cached
    try:
        if constants.HF_HUB_OFFLINE:
            raise OSError("HF_HUB_OFFLINE is set")
        socket.create_connection((urlparse(url).hostname, 443), timeout=5).close()
    except OSError as err:
        raise RuntimeError(
            f"{what}: weights {repo + '/' if repo else ''}{files[0]} are not cached here and cannot be downloaded "
            f"({err}). Download that file and pass `{flag} PATH`, or pass `{flag} random` for random weights "
            f"(smoke tests and benchmarks only).") from None
    if repo is None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(url, path)
        return path
    for f in files[:-1]:  # e.g. model.safetensors, else pytorch_model.bin
        with contextlib.suppress(RemoteEntryNotFoundError):
            return hf_hub_download(repo, f)
    return hf_hub_download(repo, files[-1])


def _read(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _mocov3_state_dict(sd, grid):
    """Official MoCo v3 checkpoint (module.base_encoder.*) -> timm ViT keys."""
    out, prefix = {}, "module.base_encoder."
    for k, v in sd.get("state_dict", sd).items():
        if k.startswith(prefix) and not k.startswith(prefix + "head"):
            k = k[len(prefix):]  # the official ViT-L file misnames four tensors of blocks 13, 14
            for a, b in (("13.norm13", "13.norm1"), ("13.mlp.fc13", "13.mlp.fc1"), ("14.norm14", "14.norm2"),
                         ("14.mlp.fc14", "14.mlp.fc2")):
                k = k.replace(f"blocks.{a}", f"blocks.{b}")
            out[k] = v
    # the official resamples the 14x14 table to 16x16 at load, then to the run's grid
    out["pos_embed"] = resample_abs_pos_embed(resample_abs_pos_embed(out["pos_embed"], [16, 16]), [grid, grid])
    return out


def _webssl_state_dict(sd, grid):
    """transformers Dinov2Model keys (the hub files the official loads) -> timm ViT keys."""
    out, qkv = {}, {}
    for k, v in sd.items():
        if m := re.fullmatch(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)", k):
            qkv.setdefault(f"blocks.{m[1]}.attn.qkv.{m[3]}", {})[m[2]] = v
            continue
        for a, b in (("embeddings.patch_embeddings.projection", "patch_embed.proj"),
                     ("embeddings.cls_token", "cls_token"), ("embeddings.position_embeddings", "pos_embed"),
                     ("encoder.layer.", "blocks."), ("attention.output.dense", "attn.proj"),
                     ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"),
                     ("mlp.weights_in", "mlp.fc1"), ("mlp.weights_out", "mlp.fc2"), ("layernorm.", "norm.")):
            k = k.replace(a, b)
        if k != "embeddings.mask_token":
            out[k] = v
    out.update({k: torch.cat([d["query"], d["key"], d["value"]]) for k, d in qkv.items()})
    # transformers resizes the table with plain bicubic (no antialias) when the grid differs
    out["pos_embed"] = resample_abs_pos_embed(out["pos_embed"], [grid, grid], antialias=False)
    return out


class Encoder(nn.Module):
    """Frozen target encoder: uint8 images (B,3,R,R) -> patch tokens (B,(R/16)^2,D) float32."""

    def __init__(self, model, spec, resolution):
        super().__init__()
        self.model, self.spec, self.resolution = model, spec, resolution
        self.size = spec["px"] * resolution // 256  # the encoder's input side
        self.embed_dim = model.num_features
        self.num_prefix = getattr(model, "num_prefix_tokens", 0)  # CLS + registers, dropped
        if spec["prenorm"]:
            self.model.norm = nn.Identity()
        for name, s in zip(("mean", "std"), spec["stats"]):  # built once: no host-to-device copy per step
            self.register_buffer(name, torch.tensor(s).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode=True):  # frozen: stays in eval mode
        return super().train(False)

    def preprocess(self, x):
        if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != (3, self.resolution, self.resolution):
            raise ValueError(f"expected uint8 images (B,3,{self.resolution},{self.resolution}), "
                             f"got {x.dtype} {tuple(x.shape)}")
        x = x / 255.0  # (B,3,R,R) float32
        if self.size == self.resolution:  # resizing to the same size is the identity in every official mode
            return (x - self.mean) / self.std
        if self.spec["norm_first"]:
            return F.interpolate((x - self.mean) / self.std, size=self.size, mode=self.spec["mode"])
        return (F.interpolate(x, size=self.size, mode=self.spec["mode"]) - self.mean) / self.std

    @torch.no_grad()
    def forward(self, x):
        h = self.model.forward_features(self.preprocess(x))
        h = h.flatten(1, 2) if h.ndim == 4 else h[:, self.num_prefix:]  # Hiera: (B,h,w,C); ViTs: (B,P+T,D)
        return h.float()  # (B,(R/16)^2,D)


def load_encoder(name, resolution=256, weights=None):
    """Frozen encoder `name` for images of side `resolution` (a multiple of 16). weights: None = pretrained (hub
    cache, else download), PATH = local checkpoint file, "random" = random init (warns; tests and benchmarks only)."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; valid names: {', '.join(ENCODERS)}")
    if resolution <= 0 or resolution % 16:
        raise ValueError(f"resolution must be a positive multiple of 16, got {resolution}")
    spec = ENCODERS[name]
    tid, arch = spec["timm_id"], spec["timm_id"].split(".")[0]
    if arch not in timm.list_models(arch):
        raise RuntimeError(f"{name} needs timm model {arch}, which timm {timm.__version__} lacks: upgrade timm")
    size, grid = spec["px"] * resolution // 256, resolution // 16
    kw = dict(spec["kw"], num_classes=0)
    if arch.startswith("vit_pe_"):  # official PE: RoPE on integer grid positions; table resized after loading
        kw["ref_feat_shape"] = (grid, grid)
    elif not arch.startswith("sam2"):  # Hiera takes any input size
        kw["img_size"] = size
    what, flag = f"encoder {name}", "--encoder-weights"
    if weights == "random":
        warnings.warn(f"{what} has RANDOM weights: its targets are meaningless (tests/benchmarks only)")
    elif weights is None and name.startswith("mocov3"):
        raise RuntimeError(f"{what} has no downloadable weights: pass `{flag} PATH` (the official MoCo v3 "
                           f"checkpoint, vit-{name[-1]}-300ep.pth.tar) or `{flag} random`")
    elif weights is None and name.startswith("webssl"):  # e.g. facebook/webssl-dino1b-full2b-224
        weights = _weights_file(what, flag, "facebook/webssl-" + name[11:].replace("_", "-"), ["model.safetensors"])
    elif weights is None:
        cfg = timm.models.get_pretrained_cfg(tid)
        files = [cfg.hf_hub_filename or "model.safetensors", "pytorch_model.bin"] if cfg.hf_hub_id else [cfg.url]
        weights = _weights_file(what, flag, cfg.hf_hub_id, files)
    if weights != "random" and not os.path.isfile(weights):
        raise FileNotFoundError(f"{what}: weights file not found: {weights}")
    renamed = "." not in tid  # mocov3 / webssl: no timm tag; timm builds the bare arch, the official file is renamed
    model = timm.create_model(tid, pretrained=weights != "random" and not renamed,
                              pretrained_cfg_overlay=dict(file=weights), **kw)
    if renamed and weights != "random":
        sd = (_mocov3_state_dict if name.startswith("mocov3") else _webssl_state_dict)(_read(weights), grid)
        model.load_state_dict(sd, strict=True)
    if "ref_feat_shape" in kw:
        pos = model.pos_embed  # official PE: bilinear, no antialias, from the pretrained grid
        model.set_input_size(img_size=size)
        model.pos_embed = nn.Parameter(resample_abs_pos_embed(
            pos, [grid, grid], num_prefix_tokens=model.num_prefix_tokens, interpolation="bilinear", antialias=False))
    return Encoder(model, spec, resolution)


# ---- SD-VAE: CompVis AutoencoderKL in plain torch, parameter names as in diffusers ----

class _Resnet(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class _Attention(nn.Module):
    """Single-head self-attention over the H*W positions, residual."""

    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # diffusers' to_out.1 is a parameter-free dropout

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B,HW,C)
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))
        return x + self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)


class _Mid(nn.Module):
    """diffusers UNetMidBlock2D: resnet, attention, resnet."""

    def __init__(self, c, groups):
        super().__init__()
        self.resnets = nn.ModuleList([_Resnet(c, c, groups), _Resnet(c, c, groups)])
        self.attentions = nn.ModuleList([_Attention(c, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class _Level(nn.Module):
    """diffusers DownEncoderBlock2D / UpDecoderBlock2D: n resnets, then an optional 2x down- or up-sampling conv."""

    def __init__(self, cin, c, n, groups, sampler=None):
        super().__init__()
        self.resnets = nn.ModuleList([_Resnet(cin if i == 0 else c, c, groups) for i in range(n)])
        self.sampler = sampler
        if sampler:  # parameter names down_blocks.i.downsamplers.0.conv / up_blocks.i.upsamplers.0.conv
            conv = nn.Conv2d(c, c, 3, stride=2) if sampler == "down" else nn.Conv2d(c, c, 3, padding=1)
            setattr(self, f"{sampler}samplers", nn.ModuleList([nn.ModuleDict(dict(conv=conv))]))

    def forward(self, x):
        for m in self.resnets:
            x = m(x)
        if self.sampler == "down":  # pad right and bottom only, then the stride-2 conv
            x = self.downsamplers[0]["conv"](F.pad(x, (0, 1, 0, 1)))
        if self.sampler == "up":
            x = self.upsamplers[0]["conv"](F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class _Coder(nn.Module):
    """diffusers' Encoder (down=True: levels, then mid block) or Decoder (mid block, then levels)."""

    def __init__(self, widths, layers, groups, down):
        super().__init__()
        w, self.down = (widths if down else widths[::-1]), down
        self.conv_in = nn.Conv2d(3 if down else 4, w[0], 3, padding=1)
        levels = nn.ModuleList([_Level(w[max(i - 1, 0)], c, layers if down else layers + 1, groups,
                                       i < len(w) - 1 and ("down" if down else "up")) for i, c in enumerate(w)])
        setattr(self, "down_blocks" if down else "up_blocks", levels)
        self.mid_block = _Mid(w[-1] if down else w[0], groups)
        self.conv_norm_out = nn.GroupNorm(groups, w[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(w[-1], 8 if down else 3, 3, padding=1)  # encoder: posterior mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for m in [*self.down_blocks, self.mid_block] if self.down else [self.mid_block, *self.up_blocks]:
            x = m(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    """AutoencoderKL, f8, 4 latent channels. Defaults = sd-vae-ft-mse (83,653,863 parameters)."""

    def __init__(self, widths=(128, 256, 512, 512), layers=2, groups=32):
        super().__init__()
        self.encoder, self.decoder = _Coder(widths, layers, groups, True), _Coder(widths, layers, groups, False)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(8, 8, 1), nn.Conv2d(4, 4, 1)
        self.register_buffer("latent_shift", torch.zeros(1, 4, 1, 1), persistent=False)
        self.register_buffer("latent_scale", torch.full((1, 4, 1, 1), 0.18215), persistent=False)

    @torch.no_grad()
    def encode(self, x):
        """x in [-1,1] (B,3,R,R) -> posterior mean, std, each (B,4,R/8,R/8)."""
        if self.encoder is None:
            raise RuntimeError("this VAE was loaded from a decoder-only file: it can decode but not encode")
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    @torch.no_grad()
    def decode(self, z):
        """Unscaled latents (B,4,r,r) -> images (B,3,8r,8r), nominally in [-1,1]."""
        return self.decoder(self.post_quant_conv(z))

    def scale(self, z):  # VAE latents -> diffusion-model space
        return (z - self.latent_shift) * self.latent_scale

    def unscale(self, z):
        return z / self.latent_scale + self.latent_shift

    def load_diffusers(self, sd):
        """Strict load of a diffusers AutoencoderKL state dict; a decoder-only file drops the encoder."""
        old = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # pre-2023 diffusers names
        sd = {re.sub(r"attentions\.0\.(query|key|value|proj_attn)\.", lambda m: f"attentions.0.{old[m[1]]}.", k): v
              for k, v in sd.items()}
        if not any(k.startswith("encoder.") for k in sd):
            self.encoder = self.quant_conv = None
        self.load_state_dict(sd, strict=True)
        return self


def load_vae(weights=None, stats=None):
    """Frozen SD-VAE. weights: None = stabilityai/sd-vae-ft-mse (hub cache, else download), PATH = a diffusers
    AutoencoderKL file (decoder-only allowed), "random" = random init (warns). stats: None = scale 0.18215 (REPA),
    PATH = per-channel latents_scale/latents_bias file (iREPA / REPA-E)."""
    if weights == "random":
        warnings.warn("SD-VAE has RANDOM weights: latents and decoded images are meaningless (tests/benchmarks only)")
    else:
        weights = weights or _weights_file("SD-VAE", "--vae-weights", "stabilityai/sd-vae-ft-mse",
                                           ["diffusion_pytorch_model.safetensors"])
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"SD-VAE weights file not found: {weights}")
    vae = VAE() if weights == "random" else VAE().load_diffusers(_read(weights))
    if stats:
        s = torch.load(stats, map_location="cpu", weights_only=True)
        vae.latent_scale.copy_(s["latents_scale"].reshape(1, 4, 1, 1))
        vae.latent_shift.copy_(s["latents_bias"].reshape(1, 4, 1, 1))
    return vae.requires_grad_(False).eval()
