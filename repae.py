"""
REPA-E (Leng et al. 2025, arXiv 2504.10483): the SD-VAE trains end to end with the SiT. The
diffusion loss alone would collapse the latents, so only the alignment loss (REPA or iREPA, through
the frozen SiT) reaches the VAE, beside its own reconstruction losses. A BatchNorm on the latents
replaces the fixed scale and shift. One step has four phases (Stage.step):
  1. VAE forward: posterior, sampled latents z, reconstruction;
  2. VAE update: L1 + LPIPS + KL + GAN + alignment through the frozen SiT (gradient via z);
  3. discriminator update: hinge loss on the detached reconstruction;
  4. SiT update: denoising + alignment on z.detach() through the latent BatchNorm.
The tuned VAE is a product: `export` writes it for train.py's --vae-weights and --vae-stats.

    python repae.py export --ckpt out/RUN --out e2e-vae.pt   # + e2e-vae-latents-stats.pt
"""
import contextlib
import copy
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import align
from data import Parser, readable_checkpoint

# The official loss configuration (l1_lpips_kl_gan.yaml): the GAN is on from step 0, its weight a
# constant (no adaptive weight), no LeCam term.
PERCEPTUAL_WEIGHT = 1.0
KL_WEIGHT = 1e-6
GAN_WEIGHT = 0.1
CLIP = 1.0  # gradient-norm clip of each of the three optimisers


def read_weights(path, what, flag):
    """A local weights file (torch or safetensors) as a state dict: nothing is downloaded here."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"{what} weights: {path or 'no file given'} is not a file "
                                f"(pass {flag} PATH)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)

# -----------------------------------------------------------------------------
# LPIPS on VGG16, and the PatchGAN discriminator


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018): five VGG16 ReLU outputs, each unit-normalised per position; their
    squared differences weighted per channel (1x1 conv, no bias), averaged over positions, summed.
    VGG layers are named as torchvision's and timm's vgg16 (features.N.*), so their files load.
    official_input: REPA-E feeds [-1, 1] images to a 2x - 1 mapping written for [0, 1] ones."""

    def __init__(self, widths=(64, 128, 256, 512, 512), official_input=True):
        super().__init__()
        self.official_input = official_input
        layers, c = [], 3
        for i, (w, convs) in enumerate(zip(widths, (2, 2, 3, 3, 3))):
            if i > 0:
                layers.append(nn.MaxPool2d(2, 2))
            for _ in range(convs):
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True)]
                c = w
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList([nn.Conv2d(w, 1, 1, bias=False) for w in widths])
        # LPIPS's ScalingLayer: the ImageNet statistics of [-1, 1] images
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        self.register_buffer("shift", shift, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.requires_grad_(False).eval()

    def forward(self, a, b):
        # a, b: images (B, 3, H, W) in [-1, 1] -> distances (B,)
        if self.official_input:
            a, b = 2 * a - 1, 2 * b - 1
        h = (torch.cat([a, b]) - self.shift) / self.scale   # one VGG pass for both
        taps = []
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):  # each block's last ReLU: relu1_2 ... relu4_3
                taps.append(h)
            h = layer(h)
        dist = 0
        for f, lin in zip(taps + [h], self.lins):  # h: relu5_3
            f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            fa, fb = f.chunk(2)                              # (B, C, h, w) each
            dist = dist + lin((fa - fb) ** 2).mean(dim=(2, 3))  # (B, 1)
        return dist.flatten()


def load_lpips(vgg, lin, official_input=True):
    """LPIPS from a VGG16 file (timm's vgg16.tv_in1k or torchvision's vgg16-397923af.pth) and
    LPIPS's linear layers (vgg.pth: lin{k}.model.1.weight); "random" for either: tests only."""
    lpips = LPIPS(official_input=official_input)
    if "random" in (vgg, lin):
        warnings.warn("REPA-E's LPIPS has RANDOM weights: its loss is meaningless (tests only)")
    if vgg != "random":
        sd = read_weights(vgg, "LPIPS's VGG16", "--repae-vgg")
        feats = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        lpips.features.load_state_dict(feats)
    if lin != "random":
        sd = read_weights(lin, "LPIPS's linear layers", "--repae-lpips")
        lpips.lins.load_state_dict({f"{k}.weight": sd[f"lin{k}.model.1.weight"] for k in range(5)})
    return lpips


class PatchGAN(nn.Module):
    """taming-transformers' NLayerDiscriminator (pix2pix's PatchGAN) with BatchNorm: a logit per
    overlapping patch, (B, 3, H, W) -> (B, 1, H/8 - 2, W/8 - 2). Names as the official: main.N.*"""

    def __init__(self, ndf=64, n_layers=3):
        super().__init__()
        layers, c = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)], ndf
        for n in range(1, n_layers + 1):  # widths double up to 8 ndf; the last has stride 1
            w = ndf * min(2 ** n, 8)
            layers += [nn.Conv2d(c, w, 4, 2 if n < n_layers else 1, 1, bias=False),
                       nn.BatchNorm2d(w), nn.LeakyReLU(0.2, True)]
            c = w
        self.main = nn.Sequential(*layers, nn.Conv2d(c, 1, 4, 1, 1))
        for m in self.modules():  # the official init; conv biases keep PyTorch's
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def load_discriminator(path=None):
    """The discriminator: the official random init, or a file of main.N.* (the official
    sdvae-f8d4-discriminator-ckpt.pt, or one this file's export wrote)."""
    disc = PatchGAN()
    if path:
        disc.load_state_dict(read_weights(path, "REPA-E's discriminator", "--repae-disc"))
    return disc

# -----------------------------------------------------------------------------
# The end-to-end step


def sit_hidden(net, x, t, y, depth):
    """SiT's tokens after block `depth` (B, T, D): its forward stops there, as the official
    align_only pass does (the VAE's alignment needs nothing after it)."""
    h = net.x_embedder(x) + net.pos_embed                    # (B, T, D)
    c = net.t_embedder(t) + net.y_embedder(y)                # (B, D)
    for block in net.blocks[:depth]:
        h = block(h, c)
    return h


def latent_stats(bn_state):
    """A latent BatchNorm's statistics as a --vae-stats file holds them: scale = 1 / sqrt(var)
    (no eps, as the official export), bias = mean, each (1, 4, 1, 1)."""
    return dict(latents_scale=bn_state["running_var"].rsqrt().view(1, -1, 1, 1),
                latents_bias=bn_state["running_mean"].view(1, -1, 1, 1))


class Stage:
    """REPA-E's training state: the SiT and its projector, the SD-VAE (trained now), the latent
    BatchNorm, LPIPS, the discriminator, three AdamW optimisers, and the EMA of the SiT and of its
    BatchNorm (what sampling and the export use). step() trains; state_dict() is a checkpoint."""

    def __init__(self, net, proj, vae, lpips, disc, align_depth, gamma, coeff, vae_coeff=1.5,
                 lr=1e-4, vae_lr=1e-4, disc_lr=1e-4, ema_decay=0.9999, amp=None):
        self.net, self.proj, self.lpips, self.disc = net, proj, lpips, disc
        self.vae = vae.requires_grad_(True).train()
        self.depth, self.gamma, self.coeff, self.vae_coeff = align_depth, gamma, coeff, vae_coeff
        self.decay, self.amp = ema_decay, amp or contextlib.nullcontext()
        # the latent BatchNorm starts from the VAE's fixed statistics (official init_bn)
        self.bn = nn.BatchNorm2d(4, eps=1e-4, momentum=0.1, affine=False)
        self.bn.to(vae.latent_scale.device)
        self.bn.running_mean.copy_(vae.latent_shift.flatten())
        self.bn.running_var.copy_(vae.latent_scale.flatten() ** -2)
        # the official turns requires_grad on for the whole SiT, so its sin-cos table trains too
        net.pos_embed.requires_grad_(True)
        self.ema_net = copy.deepcopy(net).requires_grad_(False)
        self.ema_bn = copy.deepcopy(self.bn)
        self.opt = self.adamw([*net.parameters(), *proj.parameters()], lr)
        self.opt_vae = self.adamw(vae.parameters(), vae_lr)
        self.opt_disc = self.adamw(disc.parameters(), disc_lr)

    @staticmethod
    def adamw(params, lr):
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    def update(self, opt, loss):
        """Backward, clip the norm of opt's gradients, step; returns the norm before clipping."""
        loss.backward()
        params = [p for group in opt.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return norm

    def step(self, x, y, target):
        """One step. x: uint8 images (B, 3, R, R), y: labels (B,) (dropped here, for the SiT pass
        only), target: the encoder's tokens (B, T, Dz). Returns the losses, detached."""
        img = x.float() / 127.5 - 1                              # (B, 3, R, R) in [-1, 1]
        B = img.shape[0]

        # 1. VAE forward: this output, from before the VAE's update, feeds all three updates
        with self.amp:
            moments = self.vae.quant_conv(self.vae.encoder(img)).float()
        mean, logvar = moments.chunk(2, dim=1)                   # (B, 4, R/8, R/8) each
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        with self.amp:
            recon = self.vae.decoder(self.vae.post_quant_conv(z)).float()

        # 2. VAE update. The SiT (in eval mode: the BatchNorm's running statistics) and the
        # discriminator are frozen: the alignment's gradient reaches the VAE through z only.
        for m in (self.net, self.proj, self.disc):
            m.requires_grad_(False)
        self.bn.eval()
        t = torch.rand(B, device=z.device)     # t and noise are drawn once, reused in phase 4
        noise = torch.randn_like(z)
        tt = t.view(-1, 1, 1, 1)
        with self.amp:
            h = sit_hidden(self.net, (1 - tt) * self.bn(z) + tt * noise, t, y, self.depth)
            vae_align = align.alignment_loss(self.proj, h, target, self.gamma)
        rec = (img - recon).abs().mean()                         # losses in fp32, as the official
        perceptual = self.lpips(img, recon).mean()
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum() / B  # to N(0, I), per image
        gan = -self.disc(recon).mean()  # train mode: batch statistics, running ones updated
        vae_loss = (rec + PERCEPTUAL_WEIGHT * perceptual + KL_WEIGHT * kl + GAN_WEIGHT * gan
                    + self.vae_coeff * vae_align)
        norm_vae = self.update(self.opt_vae, vae_loss)

        # 3. Discriminator update, hinge loss. Real and fake go in separate calls: each gets its
        # own BatchNorm statistics (one concatenated batch would change the logits).
        self.disc.requires_grad_(True)
        real, fake = self.disc(img), self.disc(recon.detach())
        d_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
        norm_disc = self.update(self.opt_disc, d_loss)

        # 4. SiT update on the detached latents: the diffusion loss never reaches the VAE. The
        # BatchNorm normalises with batch statistics and updates its running ones.
        self.net.requires_grad_(True)
        self.proj.requires_grad_(True)
        self.bn.train()
        zn = self.bn(z.detach())
        drop = torch.rand(B, device=y.device) < 0.1  # label dropout for CFG: the null class
        y = torch.where(drop, self.net.num_classes, y)
        with self.amp:
            out, h = self.net((1 - tt) * zn + tt * noise, t, y, self.depth)
            rep = align.alignment_loss(self.proj, h, target, self.gamma)
        denoise = ((out.float() - (noise - zn)) ** 2).mean(dim=(1, 2, 3)).mean()
        loss = denoise + self.coeff * rep
        norm = self.update(self.opt, loss)
        self.update_ema()
        logs = dict(loss=loss, denoise=denoise, repa=rep, grad_norm=norm, vae_loss=vae_loss,
                    rec=rec, lpips=perceptual, kl=kl, gan=gan, vae_align=vae_align,
                    grad_norm_vae=norm_vae, d_loss=d_loss, grad_norm_disc=norm_disc,
                    logits_real=real.mean(), logits_fake=fake.mean())
        return {k: v.detach() for k, v in logs.items()}

    @torch.no_grad()
    def update_ema(self):
        # every SiT parameter and the BatchNorm's running statistics, as the official update_ema
        live = [*self.net.parameters(), self.bn.running_mean, self.bn.running_var]
        ema = [*self.ema_net.parameters(), self.ema_bn.running_mean, self.ema_bn.running_var]
        torch._foreach_lerp_(ema, live, 1 - self.decay)
        self.ema_bn.num_batches_tracked.copy_(self.bn.num_batches_tracked)

    def parts(self):
        # checkpoint key -> what it holds (model, ema, vae, discriminator, opt*: the official names)
        return dict(model=self.net, proj=self.proj, ema=self.ema_net, bn=self.bn,
                    ema_bn=self.ema_bn, vae=self.vae, discriminator=self.disc, opt=self.opt,
                    opt_vae=self.opt_vae, opt_disc=self.opt_disc)

    def state_dict(self):
        return {key: part.state_dict() for key, part in self.parts().items()}

    def load_state_dict(self, state):
        for key, part in self.parts().items():
            part.load_state_dict(state[key])

    def sampling_vae(self):
        """The VAE, its scale and shift set from the EMA BatchNorm: for sample.generate."""
        stats = latent_stats(self.ema_bn.state_dict())
        self.vae.latent_scale.copy_(stats["latents_scale"])
        self.vae.latent_shift.copy_(stats["latents_bias"])
        return self.vae

# -----------------------------------------------------------------------------
# train.py's side: flags and the stage from its built pieces; the export


def add_args(p):
    """REPA-E's flags, added to train.py's parser."""
    p.add_argument("--repae", action="store_true",
                   help="REPA-E: tune the SD-VAE end to end with the SiT (repae.py)")
    p.add_argument("--repae-vgg", help="REPA-E's LPIPS: VGG16 weights (timm's vgg16.tv_in1k or "
                   "torchvision's vgg16-397923af.pth), or 'random' (tests)")
    p.add_argument("--repae-lpips", help="REPA-E's LPIPS: its linear layers (vgg.pth), or 'random'")
    p.add_argument("--repae-disc", help="REPA-E: a pretrained discriminator (the official "
                   "sdvae-f8d4-discriminator-ckpt.pt); default: the official random init")
    p.add_argument("--lpips-fixed-input", action="store_true", help="REPA-E: LPIPS gets [-1, 1] "
                   "images as they are (the official maps them again with 2x - 1)")
    p.add_argument("--vae-lr", type=float, default=1e-4, help="REPA-E: the VAE's learning rate")
    p.add_argument("--disc-lr", type=float, default=1e-4, help="REPA-E: the discriminator's")
    p.add_argument("--vae-align-coeff", type=float, default=1.5,
                   help="REPA-E: weight of the alignment loss in the VAE's update")


def build(args, net, projector, vae, amp=None):
    """The stage from train.py's network, projector and VAE (on their device) and the flags."""
    if projector is None:
        raise RuntimeError("REPA-E tunes the VAE through the alignment loss: pass --encoder NAME")
    if vae.encoder is None:
        raise RuntimeError(f"REPA-E trains the VAE's encoder: --vae-weights {args.vae_weights} "
                           "is a decoder-only file")
    device = vae.latent_scale.device
    lpips = load_lpips(args.repae_vgg, args.repae_lpips, not args.lpips_fixed_input).to(device)
    disc = load_discriminator(args.repae_disc).to(device)
    return Stage(net, projector, vae, lpips, disc, args.encoder_depth, args.spnorm_gamma,
                 args.proj_coeff, args.vae_align_coeff, args.lr, args.vae_lr, args.disc_lr,
                 float(args.ema.split(",")[0]), amp)


def export(ckpt, out):
    """Writes a REPA-E checkpoint's VAE to `out` (a state dict with diffusers' names, as
    --vae-weights reads) and its EMA BatchNorm's statistics beside it (--vae-stats), as the
    official save_vae_weights.py does; returns the statistics file's path."""
    path, ck = readable_checkpoint(ckpt)
    if "vae" not in ck:
        raise ValueError(f"{path} is not a REPA-E checkpoint (it holds no VAE)")
    stats = os.path.splitext(out)[0] + "-latents-stats.pt"
    torch.save(dict(ck["vae"]), out)
    torch.save(latent_stats(ck["ema_bn"]), stats)
    return stats


if __name__ == "__main__":
    p = Parser("REPA-E's tuned VAE, exported for --vae-weights and --vae-stats")
    p.add_argument("command", choices=["export"])
    p.add_argument("--ckpt", required=True, help="a REPA-E run folder or checkpoint file")
    p.add_argument("--out", required=True, help="the VAE file to write, e.g. e2e-vae.pt")
    a = p.parse_args()
    try:
        stats_file = export(a.ckpt, a.out)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    print(f"wrote {a.out} and {stats_file}: use them as --vae-weights {a.out} "
          f"--vae-stats {stats_file}")
