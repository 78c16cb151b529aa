"""Frozen target encoders for REPA / iREPA through timm, with the official iREPA preprocessing and
token choice (README, "Encoders and metrics"); the SD-VAE in plain torch with diffusers' keys."""
import os
import re
import socket
import warnings
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from timm.layers import resample_abs_pos_embed

from data import fitting, read_weights

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def _enc(timm_id, px, mode="bicubic", norm_first=True, stats=IMAGENET, prenorm=False, kw=None):
    # px: input side for 256 px images (scaled by R/256); mode: the resize (never antialiased);
    # norm_first: normalise, then resize; prenorm: tokens before the final norm; kw: for timm
    return dict(timm_id=timm_id, px=px, mode=mode, norm_first=norm_first, stats=stats,
                prenorm=prenorm, kw=kw or {})


def _webssl(dim, depth, heads):
    # DINOv2's SwiGLU (hidden (int(4d*2/3)+7)//8*8) packed in one fc1; +0.5: timm's int() exact
    hidden = 2 * ((int(dim * 4 * 2 / 3) + 7) // 8 * 8)
    kw = dict(embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=(hidden + 0.5) / dim)
    return _enc("vit_giant_patch14_dinov2", 224, kw=kw)


SIZE = dict(s="small", b="base", l="large", h="huge", g="giant")
DINOV3 = dict(s16="small", s16plus="small_plus", b16="base", l16="large", h16plus="huge_plus")
WEBSSL = dict(dino300m_full2b=(1024, 24, 16), dino1b_full2b=(1536, 40, 24),  # dim, depth, heads
              dino2b_full2b=(2688, 24, 21), dino3b_full2b=(3072, 26, 24),
              dino5b_full2b=(3584, 32, 28), dino7b_full8b=(4096, 32, 32))
BILINEAR = dict(mode="bilinear", norm_first=False)  # resize, then normalise
SIGLIP = dict(kw=dict(act_layer="gelu_tanh"))  # HF's tanh-GELU; ImageNet mean/std (official)
PE = dict(BILINEAR, stats=((0.5,) * 3, (0.5,) * 3), prenorm=True)
ENCODERS = {
    **{f"dinov2-vit-{s}": _enc(f"vit_{SIZE[s]}_patch14_dinov2.lvd142m", 224) for s in "sblg"},
    **{f"dinov2reg-vit-{s}": _enc(f"vit_{SIZE[s]}_patch14_reg4_dinov2.lvd142m", 224)
       for s in "sblg"},
    **{f"dinov3-vit-{k}": _enc(f"vit_{v}_patch16_dinov3_qkvb.lvd1689m", 256, **BILINEAR)
       for k, v in DINOV3.items()},
    "dinov3-vit-7b16": _enc("vit_7b_patch16_dinov3.lvd1689m", 256, **BILINEAR),
    **{f"dino-vit-{s}": _enc(f"vit_{SIZE[s]}_patch16_224.dino", 256) for s in "sb"},
    "clip-vit-L": _enc("vit_large_patch14_clip_quickgelu_224.openai", 224, norm_first=False,
                       stats=CLIP, prenorm=True),
    "mae-vit-l": _enc("vit_large_patch16_224.mae", 256, prenorm=True),
    "jepa-vit-h": _enc("vit_huge_patch14_gap_224.in1k_ijepa", 224),
    **{f"mocov3-vit-{s}": _enc(f"vit_{SIZE[s]}_patch16_224", 256) for s in "bl"},
    **{f"webssl-vit-{k}_224": _webssl(*shape) for k, shape in WEBSSL.items()},
    **{f"siglip-vit-{s}": _enc(f"vit_{SIZE[s]}_patch16_siglip_256.webli", 256, **SIGLIP)
       for s in "bl"},
    "siglip-vit-so400m": _enc("vit_so400m_patch14_siglip_224.webli", 224, **SIGLIP),
    **{f"siglip2-vit-{s}": _enc(f"vit_{SIZE[s]}_patch16_siglip_256.v2_webli", 256, **SIGLIP)
       for s in "bl"},
    "siglip2-vit-so400m": _enc("vit_so400m_patch16_siglip_256.v2_webli", 256, **SIGLIP),
    "siglip2-vit-g": _enc("vit_giantopt_patch16_siglip_256.v2_webli", 256, **SIGLIP),
    "pe-vit-t": _enc("vit_pe_core_tiny_patch16_384.fb", 256, **PE),
    "pe-vit-s": _enc("vit_pe_core_small_patch16_384.fb", 256, **PE),
    "pe-vit-b": _enc("vit_pe_core_base_patch16_224.fb", 256, **PE),
    "pe-vit-l": _enc("vit_pe_core_large_patch14_336.fb", 224, **PE),
    "pe-vit-g": _enc("vit_pe_core_gigantic_patch14_448.fb", 224, **PE),
    "spatialpe-vit-b": _enc("vit_pe_spatial_base_patch16_512.fb", 256, **PE),
    "spatialpe-vit-l": _enc("vit_pe_spatial_large_patch14_448.fb", 224, **PE),
    "spatialpe-vit-g": _enc("vit_pe_spatial_gigantic_patch14_448.fb", 224, **PE),
    "langpe-vit-l": _enc("vit_pe_lang_large_patch14_448.fb", 224, **PE),
    "langpe-vit-g": _enc("vit_pe_lang_gigantic_patch14_448.fb", 224, **PE),
    "sam2-vit-s": _enc("sam2_hiera_small.fb_r896", 512, norm_first=False),  # stride 32, fed 2R
    "sam2-vit-b": _enc("sam2_hiera_base_plus.fb_r896", 512, norm_first=False),
    "sam2-vit-l": _enc("sam2_hiera_large.fb_r1024", 512, norm_first=False),
    **{f"cradio-vit-{s}": _enc(f"vit_{SIZE[s]}_patch16_radio_v3.c_radio", 256, **BILINEAR,
                               stats=CLIP) for s in "blhg"},  # RADIO normalises inside
}


def _cached(who, flag, repo, files):
    """Hub `repo`'s first cached file of `files` (no repo: the URL files[0]'s), None to download."""
    url = files[0] if repo is None else constants.ENDPOINT
    hub = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    paths = [hub] if repo is None else [try_to_load_from_cache(repo, f) for f in files]
    for path in paths:
        if isinstance(path, str) and os.path.isfile(path):
            return path
    why = "HF_HUB_OFFLINE is set"
    if not constants.HF_HUB_OFFLINE:
        try:
            socket.create_connection((urlparse(url).hostname, 443), timeout=5).close()
            return None  # online: the caller downloads
        except OSError as err:
            why = err
    raise RuntimeError(f"{who} weights {repo + '/' if repo else ''}{files[0]} are not cached "
                       f"here, nor downloadable ({why}): pass `{flag} PATH` or `{flag} random`")


def _mocov3_state_dict(sd, grid):
    """Official MoCo v3 checkpoint (module.base_encoder.*) -> timm ViT keys."""
    # the official ViT-L file misnames four tensors of blocks 13 and 14
    misnamed = {"norm13": "norm1", "fc13": "fc1", "norm14": "norm2", "fc14": "fc2"}
    out, prefix = {}, "module.base_encoder."
    for k, v in sd.get("state_dict", sd).items():
        if k.startswith(prefix) and not k.startswith(prefix + "head"):
            k = k[len(prefix):]
            for a, b in misnamed.items():
                k = k.replace(a, b)
            out[k] = v
    # the official resamples the 14x14 table to 16x16 at load, then to the run's grid
    pos = resample_abs_pos_embed(out["pos_embed"], [16, 16])
    out["pos_embed"] = resample_abs_pos_embed(pos, [grid, grid])
    return out


def _webssl_state_dict(sd, grid):
    """transformers Dinov2Model keys (the hub files the official loads) -> timm ViT keys."""
    renames = {"embeddings.patch_embeddings.projection": "patch_embed.proj",
               "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
               "encoder.layer.": "blocks.", "attention.output.dense": "attn.proj",
               "attention.attention.": "attn.", "layer_scale1.lambda1": "ls1.gamma",
               "layer_scale2.lambda1": "ls2.gamma", "mlp.weights_in": "mlp.fc1",
               "mlp.weights_out": "mlp.fc2", "layernorm.": "norm."}
    out = {}
    for k, v in sd.items():
        for a, b in renames.items():
            k = k.replace(a, b)
        if k != "embeddings.mask_token":
            out[k] = v
    for q in [k for k in out if ".attn.query." in k]:  # q, k, v -> one qkv
        qkv = [out.pop(q.replace("query", n)) for n in ("query", "key", "value")]
        out[q.replace("query", "qkv")] = torch.cat(qkv)
    # transformers resizes the table with plain bicubic (no antialias) when the grid differs
    out["pos_embed"] = resample_abs_pos_embed(out["pos_embed"], [grid, grid], antialias=False)
    return out


class Encoder(nn.Module):
    """Frozen target encoder: uint8 images (B, 3, R, R) -> patch tokens (B, (R/16)^2, D) fp32."""
    def __init__(self, model, spec, resolution):
        super().__init__()
        self.model, self.spec, self.resolution = model, spec, resolution
        self.size = spec["px"] * resolution // 256  # the encoder's input side
        self.embed_dim = model.num_features
        self.num_prefix = getattr(model, "num_prefix_tokens", 0)  # CLS + registers, dropped
        if spec["prenorm"]:
            self.model.norm = nn.Identity()
        for name, s in zip(("mean", "std"), spec["stats"]):
            self.register_buffer(name, torch.tensor(s).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def preprocess(self, x):
        R = self.resolution
        if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != (3, R, R):
            raise ValueError(f"expected uint8 (B, 3, {R}, {R}), got {x.dtype} {tuple(x.shape)}")
        x = x / 255.0  # (B, 3, R, R) float32
        if self.size == R:  # no resize pass where it would be the identity (each step's cost)
            return (x - self.mean) / self.std
        if self.spec["norm_first"]:
            return F.interpolate((x - self.mean) / self.std, size=self.size, mode=self.spec["mode"])
        return (F.interpolate(x, size=self.size, mode=self.spec["mode"]) - self.mean) / self.std

    @torch.no_grad()
    def forward(self, x):
        h = self.model.forward_features(self.preprocess(x))
        h = h.flatten(1, 2) if h.ndim == 4 else h[:, self.num_prefix:]  # Hiera: (B, h, w, C)
        return h.float()  # (B, (R/16)^2, D)


def load_encoder(name, resolution=256, weights=None):
    """Frozen encoder of R x R images (16 divides R); weights: None (timm's), PATH, "random"."""
    spec = ENCODERS[name]
    tid = spec["timm_id"]
    size, grid = spec["px"] * resolution // 256, resolution // 16
    kw = dict(spec["kw"], num_classes=0)
    if tid.startswith("vit_pe_"):  # official PE: RoPE on integer grid positions
        kw["ref_feat_shape"] = (grid, grid)
    elif not tid.startswith("sam2"):  # Hiera takes any input size
        kw["img_size"] = size
    who, flag = f"encoder {name}:", "--encoder-weights"
    if weights == "random":
        warnings.warn(f"{who} RANDOM weights (tests and benchmarks only)")
    elif weights is None and name.startswith("mocov3"):
        raise RuntimeError(f"{who} no download exists: pass `{flag} PATH` (the official MoCo v3 "
                           f"checkpoint, vit-{name[-1]}-300ep.pth.tar) or `{flag} random`")
    elif weights is None and name.startswith("webssl"):
        repo, file = "facebook/webssl-" + name[11:].replace("_", "-"), "model.safetensors"
        weights = _cached(who, flag, repo, [file]) or hf_hub_download(repo, file)
    elif weights is None:  # None after this: timm downloads its weights itself
        cfg = timm.models.get_pretrained_cfg(tid)
        files = ["model.safetensors", "pytorch_model.bin"] if cfg.hf_hub_id else [cfg.url]
        weights = _cached(who, flag, cfg.hf_hub_id, files)
    renamed = "." not in tid  # mocov3, webssl: a bare timm arch, the file renamed
    # read here too (timm reads it again): an unreadable file is one line
    sd = read_weights(weights, flag, mmap=True) if weights not in (None, "random") else None
    with fitting(weights, flag):
        model = timm.create_model(tid, pretrained=weights != "random" and not renamed,
                                  pretrained_cfg_overlay=dict(file=weights), **kw)
        if renamed and sd is not None:
            to_timm = _mocov3_state_dict if name.startswith("mocov3") else _webssl_state_dict
            model.load_state_dict(to_timm(sd, grid))
    if "ref_feat_shape" in kw:  # official PE: the table resized bilinearly, no antialias
        pos = resample_abs_pos_embed(model.pos_embed, [grid, grid], interpolation="bilinear",
                                     num_prefix_tokens=model.num_prefix_tokens, antialias=False)
        model.set_input_size(img_size=size)
        model.pos_embed = nn.Parameter(pos)
    return Encoder(model, spec, resolution)


# SD-VAE: CompVis AutoencoderKL in plain torch, parameter names as in diffusers
class _Resnet(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class _Attention(nn.Module):  # one head over the H*W positions, residual
    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # diffusers' to_out.1: a dropout

    def forward(self, x):
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))
        return x + self.to_out[0](h).transpose(1, 2).reshape(x.shape)


class _Mid(nn.Module):  # diffusers' UNetMidBlock2D
    def __init__(self, c, groups):
        super().__init__()
        self.resnets = nn.ModuleList([_Resnet(c, c, groups), _Resnet(c, c, groups)])
        self.attentions = nn.ModuleList([_Attention(c, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class _Level(nn.Module):  # diffusers' DownEncoderBlock2D / UpDecoderBlock2D
    def __init__(self, cin, c, n, groups, sampler):
        super().__init__()
        self.resnets = nn.Sequential(*[_Resnet(cin if i == 0 else c, c, groups) for i in range(n)])
        self.sampler = sampler
        if sampler:  # a 2x down- or up-sampling conv
            down = sampler == "down"
            conv = nn.Conv2d(c, c, 3, stride=2 if down else 1, padding=0 if down else 1)
            setattr(self, f"{sampler}samplers", nn.ModuleList([nn.ModuleDict(dict(conv=conv))]))

    def forward(self, x):
        x = self.resnets(x)
        if self.sampler == "down":  # pad right and bottom only, then the stride-2 conv
            x = self.downsamplers[0]["conv"](F.pad(x, (0, 1, 0, 1)))
        if self.sampler == "up":
            x = self.upsamplers[0]["conv"](F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class _Coder(nn.Module):  # diffusers' Encoder (down: levels, then mid block) or Decoder
    def __init__(self, widths, layers, groups, down):
        super().__init__()
        w = widths if down else widths[::-1]
        self.down = down
        self.conv_in = nn.Conv2d(3 if down else 4, w[0], 3, padding=1)
        n, sampler = (layers, "down") if down else (layers + 1, "up")  # resnets per level
        levels = [_Level(w[max(i - 1, 0)], c, n, groups, i < len(w) - 1 and sampler)
                  for i, c in enumerate(w)]
        setattr(self, "down_blocks" if down else "up_blocks", nn.ModuleList(levels))
        self.mid_block = _Mid(widths[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, w[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(w[-1], 8 if down else 3, 3, padding=1)  # 8: mean, log-variance

    def forward(self, x):
        x = self.conv_in(x)
        levels = self.down_blocks if self.down else self.up_blocks
        for m in [*levels, self.mid_block] if self.down else [self.mid_block, *levels]:
            x = m(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def ldm_to_diffusers(sd, levels=4):
    """CompVis/LDM names (the official iREPA and REPA-E files: sdvae-ft-mse-f8d4.pt, E2E-VAEs)
    -> diffusers' names: the decoder's levels count the other way; attention's 1x1 convs, Linear."""
    attn = dict(norm="group_norm", q="to_q", k="to_k", v="to_v", proj_out="to_out.0")
    flip = lambda m: levels - 1 - int(m[1])  # decoder.up.3 is up_blocks.0, the lowest resolution
    out = {}
    for k, v in sd.items():
        k = re.sub(r"down\.(\d+)\.block\.", r"down_blocks.\1.resnets.", k)
        k = re.sub(r"down\.(\d+)\.downsample\.", r"down_blocks.\1.downsamplers.0.", k)
        k = re.sub(r"up\.(\d+)\.block\.", lambda m: f"up_blocks.{flip(m)}.resnets.", k)
        k = re.sub(r"up\.(\d+)\.upsample\.", lambda m: f"up_blocks.{flip(m)}.upsamplers.0.", k)
        k = re.sub(r"mid\.block_(\d)\.", lambda m: f"mid_block.resnets.{int(m[1]) - 1}.", k)
        k = re.sub(r"mid\.attn_1\.(\w+)\.", lambda m: f"mid_block.attentions.0.{attn[m[1]]}.", k)
        k = k.replace("nin_shortcut", "conv_shortcut").replace("norm_out", "conv_norm_out")
        out[k] = v.flatten(1) if ".attentions." in k and v.ndim == 4 else v  # (C, C, 1, 1)
    return out


class VAE(nn.Module):
    """AutoencoderKL, f8, 4 latent channels. Defaults = sd-vae-ft-mse (83,653,863 parameters)."""
    def __init__(self, widths=(128, 256, 512, 512), layers=2, groups=32):
        super().__init__()
        self.encoder = _Coder(widths, layers, groups, down=True)
        self.decoder = _Coder(widths, layers, groups, down=False)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(8, 8, 1), nn.Conv2d(4, 4, 1)
        self.register_buffer("latent_shift", torch.zeros(1, 4, 1, 1), persistent=False)
        self.register_buffer("latent_scale", torch.full((1, 4, 1, 1), 0.18215), persistent=False)

    @torch.no_grad()
    def encode(self, x):  # x in [-1, 1] (B, 3, R, R) -> posterior mean, std (B, 4, R/8, R/8)
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    @torch.no_grad()
    def decode(self, z):  # unscaled latents (B, 4, r, r) -> images (B, 3, 8r, 8r) in ~[-1, 1]
        return self.decoder(self.post_quant_conv(z))

    def scale(self, z):  # VAE latents -> diffusion-model space
        return (z - self.latent_shift) * self.latent_scale

    def unscale(self, z):
        return z / self.latent_scale + self.latent_shift

    def load_diffusers(self, sd):
        """Strict load of a diffusers or CompVis/LDM AutoencoderKL state dict (decoder-only: no
        encode)."""
        if any(".mid.attn_1." in k for k in sd):  # the official iREPA / REPA-E files
            sd = ldm_to_diffusers(sd, len(self.decoder.up_blocks))
        old = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # < 2023
        old_key = r"attentions\.0\.(query|key|value|proj_attn)\."
        sd = {re.sub(old_key, lambda m: f"attentions.0.{old[m[1]]}.", k): v for k, v in sd.items()}
        if not any(k.startswith("encoder.") for k in sd):
            self.encoder = self.quant_conv = None
        self.load_state_dict(sd, strict=True)
        return self


def load_vae(weights=None, stats=None):
    """Frozen SD-VAE of weights None (sd-vae-ft-mse), PATH or "random"; stats: None or a file."""
    repo, file = "stabilityai/sd-vae-ft-mse", "diffusion_pytorch_model.safetensors"
    vae = VAE()
    if weights == "random":
        warnings.warn("SD-VAE: RANDOM weights (tests and benchmarks only)")
    else:
        weights = weights or _cached("SD-VAE", "--vae-weights", repo, [file])
        weights = weights or hf_hub_download(repo, file)
        with fitting(weights, "--vae-weights"):
            vae.load_diffusers(read_weights(weights, "--vae-weights"))
    if stats:
        with fitting(stats, "--vae-stats"):
            s = read_weights(stats, "--vae-stats")
            vae.latent_scale.copy_(s["latents_scale"].reshape(1, 4, 1, 1))
            vae.latent_shift.copy_(s["latents_bias"].reshape(1, 4, 1, 1))
    return vae.requires_grad_(False).eval()
