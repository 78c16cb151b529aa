"""
REPA-E (Leng et al. 2025, arXiv 2504.10483): the SD-VAE trains end to end with the SiT.
The diffusion loss alone would collapse the latents, so only the alignment loss (REPA or
iREPA, through the frozen SiT) reaches the VAE, beside its reconstruction losses. A
BatchNorm on the latents replaces the fixed scale and shift. Stage.step's four phases:
VAE forward, VAE update, discriminator update, SiT update (on the detached latents).

    torchrun --nproc_per_node=8 train.py --repae --encoder dinov2-vit-b --irepa ...  # README
    python repae.py export --ckpt out/RUN --out e2e-vae.pt  # the tuned VAE, for train.py
"""
import contextlib
import copy
import os
import warnings
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import align
import encoders
from data import Parser, fitting, read_weights, readable_checkpoint

# The official loss configuration (l1_lpips_kl_gan.yaml): L1 and LPIPS weight 1, the GAN on
# from step 0 with a constant weight (no adaptive weight), no LeCam term.
KL_WEIGHT = 1e-6
GAN_WEIGHT = 0.1

# -----------------------------------------------------------------------------
# The VAE's loss networks: LPIPS on VGG16, the PatchGAN discriminator


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018): five VGG16 ReLU outputs, unit-normalised per position; their
    squared differences weighted per channel (1x1 conv), averaged over positions, summed.
    VGG16's names (features.N.*) as torchvision's and timm's: their files load."""

    def __init__(self, widths=(64, 128, 256, 512, 512)):
        super().__init__()
        layers, c = [], 3
        for w, convs in zip(widths, (2, 2, 3, 3, 3)):
            layers.append(nn.MaxPool2d(2, 2))
            for _ in range(convs):
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True)]
                c = w
        self.features = nn.Sequential(*layers[1:])  # a pool between blocks, none before
        self.lins = nn.ModuleList([nn.Conv2d(w, 1, 1, bias=False) for w in widths])
        # LPIPS's ScalingLayer: ImageNet's mean and std in [-1, 1] units
        for name, v in (("shift", [-0.030, -0.088, -0.188]), ("scale", [0.458, 0.448, 0.450])):
            self.register_buffer(name, torch.tensor(v).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def forward(self, a, b):
        # a, b: images (B, 3, H, W) in [-1, 1] -> distances (B,); 2x - 1 as REPA-E (for [0, 1])
        h = (2 * torch.cat([a, b]) - 1 - self.shift) / self.scale  # one VGG pass for both
        taps = []
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):  # relu1_2 ... relu4_3
                taps.append(h)
            h = layer(h)
        dist = 0
        for f, lin in zip(taps + [h], self.lins):  # h: relu5_3
            f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            fa, fb = f.chunk(2)                                  # (B, C, h, w) each
            dist = dist + lin((fa - fb) ** 2).mean(dim=(2, 3))   # (B, 1)
        return dist.flatten()


def load_lpips(vgg, lin):
    """LPIPS from a VGG16 file (timm's vgg16.tv_in1k, torchvision's vgg16-397923af.pth)
    and LPIPS's vgg.pth (lin{k}.model.1.weight); "random" for either: tests only."""
    lpips = LPIPS()
    if "random" in (vgg, lin):
        warnings.warn("REPA-E's LPIPS has RANDOM weights (tests only)")
    if vgg != "random":
        sd = read_weights(vgg, "--repae-vgg")
        with fitting(vgg, "--repae-vgg"):
            lpips.features.load_state_dict(
                {k[9:]: v for k, v in sd.items() if k.startswith("features.")})
    if lin != "random":
        sd = read_weights(lin, "--repae-lpips")
        with fitting(lin, "--repae-lpips"):
            lpips.lins.load_state_dict({f"{k}.weight": sd[f"lin{k}.model.1.weight"]
                                        for k in range(5)})
    return lpips


class PatchGAN(nn.Module):
    """taming-transformers' NLayerDiscriminator (pix2pix's PatchGAN, BatchNorm): a logit
    per overlapping patch, (B, 3, H, W) -> (B, 1, H/8 - 2, W/8 - 2). Official names."""

    def __init__(self, ndf=64):
        super().__init__()
        layers = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for c, w, stride in ((1, 2, 2), (2, 4, 2), (4, 8, 1)):  # widths in ndf; n_layers 3
            layers += [nn.Conv2d(c * ndf, w * ndf, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(w * ndf), nn.LeakyReLU(0.2, True)]
        self.main = nn.Sequential(*layers, nn.Conv2d(8 * ndf, 1, 4, 1, 1))
        for m in self.modules():  # the official init (conv biases keep PyTorch's)
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def load_discriminator(path):
    """The official random init, or a file of main.N.* tensors (the official
    sdvae-f8d4-discriminator-ckpt.pt, or a REPA-E checkpoint's "discriminator")."""
    disc = PatchGAN()
    if path:
        with fitting(path, "--repae-disc"):
            disc.load_state_dict(read_weights(path, "--repae-disc"))
    return disc

# -----------------------------------------------------------------------------
# The end-to-end step


def latent_stats(bn_state):
    """A latent BatchNorm's statistics as a --vae-stats file (no eps, as the official export)."""
    return dict(latents_scale=bn_state["running_var"].rsqrt().view(1, -1, 1, 1),
                latents_bias=bn_state["running_mean"].view(1, -1, 1, 1))


def sampling_vae(vae, bn_state):
    """vae, scaled and shifted by a latent BatchNorm's statistics (to decode samples)."""
    stats = latent_stats(bn_state)
    vae.latent_scale.copy_(stats["latents_scale"])
    vae.latent_shift.copy_(stats["latents_bias"])
    return vae


def average(tensors):
    """Under torchrun, each tensor becomes its mean over the ranks (in place): DDP's gradient
    average and SyncBatchNorm's statistics, as the official gets them from accelerate."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:  # one all-reduce for them all
        flat = torch.cat([t.flatten() for t in tensors]) / world
        dist.all_reduce(flat)
        for t, f in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(f.view_as(t))


def batch_norm(bn, z):
    """bn in train mode as SyncBatchNorm: the statistics of the whole global batch
    (equal batches per rank), running ones updated; no gradient (z: detached)."""
    mean = z.mean(dim=(0, 2, 3))                                   # (4,)
    average([mean])
    var = ((z - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))  # (4,), biased
    average([var])
    n = z.numel() // z.shape[1] * (dist.get_world_size() if dist.is_initialized() else 1)
    bn.running_mean.lerp_(mean, bn.momentum)
    bn.running_var.lerp_(var * n / (n - 1), bn.momentum)  # unbiased, as BatchNorm
    bn.num_batches_tracked += 1
    return (z - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + bn.eps).sqrt()


# Stage.step's outputs, in order (train.py logs them all)
LOGGED = ("loss", "denoise", "repa", "grad_norm", "vae_loss", "rec", "lpips", "kl", "gan",
          "vae_align", "grad_norm_vae", "d_loss", "grad_norm_disc", "real", "fake")


class Stage:
    """REPA-E's training state; step() trains, parts() are what a checkpoint holds. The VAE's
    scale and shift follow the EMA of the latent BatchNorm (for sampling and the export)."""

    def __init__(self, net, proj, vae, lpips, disc, *, align_depth, gamma, coeff,
                 vae_coeff=1.5, lr=1e-4, vae_lr=1e-4, disc_lr=1e-4, ema_decay=0.9999,
                 amp=None):
        self.net, self.proj, self.lpips, self.disc = net, proj, lpips, disc
        self.vae = vae.requires_grad_(True).train()
        self.depth, self.gamma, self.coeff, self.vae_coeff = align_depth, gamma, coeff, vae_coeff
        self.decay, self.amp = ema_decay, amp or contextlib.nullcontext()
        self.hidden = lambda x, t, y: net(x, t, y, align_depth)[1]  # (B, T, D) after the block
        # the latent BatchNorm starts from the VAE's statistics (official init_bn)
        # (eval: the VAE's update reads the running statistics; batch_norm() trains them)
        self.bn = nn.BatchNorm2d(4, eps=1e-4, momentum=0.1, affine=False).eval()
        self.bn.to(vae.latent_scale.device)
        self.bn.running_mean.copy_(vae.latent_shift.flatten())
        self.bn.running_var.copy_(vae.latent_scale.flatten() ** -2)
        # the official trains the whole SiT, its sin-cos table too
        net.pos_embed.requires_grad_(True)
        self.ema_net = copy.deepcopy(net).requires_grad_(False)
        self.ema_bn = copy.deepcopy(self.bn)
        # AdamW for all three: betas (0.9, 0.999), no weight decay (official)
        adamw = partial(torch.optim.AdamW, weight_decay=0.0, fused=vae.latent_scale.is_cuda)
        self.opt = adamw([*net.parameters(), *proj.parameters()], lr)
        self.opt_vae = adamw(vae.parameters(), vae_lr)
        self.opt_disc = adamw(disc.parameters(), disc_lr)

    def update(self, opt, loss):
        loss.backward()
        params = opt.param_groups[0]["params"]
        average([p.grad for p in params if p.grad is not None])  # torchrun: as DDP
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)  # official max_grad_norm
        opt.step()
        opt.zero_grad(set_to_none=True)
        return norm

    def step(self, x, y, target):
        """x: uint8 images (B, 3, R, R), y: labels (B,), target: encoder tokens (B, T, Dz)."""
        img = x.float() / 127.5 - 1                          # (B, 3, R, R) in [-1, 1]
        B = img.shape[0]

        # 1. VAE forward: its output (before the VAE's update) feeds all three updates
        with self.amp:
            moments = self.vae.quant_conv(self.vae.encoder(img)).float()
        mean, logvar = moments.chunk(2, dim=1)               # (B, 4, R/8, R/8) each
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        with self.amp:
            recon = self.vae.decoder(self.vae.post_quant_conv(z)).float()

        # 2. VAE update; SiT (eval: BatchNorm running stats) and discriminator frozen
        for m in (self.net, self.proj, self.disc):
            m.requires_grad_(False)
        t = torch.rand(B, device=z.device)  # phase 4 reuses t and noise
        noise = torch.randn_like(z)
        tt = t.view(-1, 1, 1, 1)
        with self.amp:
            xt = (1 - tt) * self.bn(z) + tt * noise
            h = self.hidden(xt, t, y)  # compiled: the blocks after it dropped, as the official
            vae_align = align.alignment_loss(self.proj, h, target, self.gamma)
        rec = (img - recon).abs().mean()                     # the losses in fp32
        perceptual = self.lpips(img, recon).mean()
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum() / B  # per image
        gan = -self.disc(recon).mean()  # train mode: batch statistics
        vae_loss = (rec + perceptual + KL_WEIGHT * kl + GAN_WEIGHT * gan
                    + self.vae_coeff * vae_align)
        norm_vae = self.update(self.opt_vae, vae_loss)

        # 3. Discriminator update, hinge loss; real and fake in separate calls, each with
        # its own BatchNorm statistics (one joint batch would change the logits)
        self.disc.requires_grad_(True)
        real, fake = self.disc(img), self.disc(recon.detach())
        d_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
        norm_disc = self.update(self.opt_disc, d_loss)

        # 4. SiT update on detached latents (the diffusion loss never reaches the VAE);
        # the BatchNorm uses batch statistics and updates its running ones
        self.net.requires_grad_(True)
        self.proj.requires_grad_(True)
        zn = batch_norm(self.bn, z.detach())
        drop = torch.rand(B, device=y.device) < 0.1  # label dropout for CFG, SiT pass only
        y = torch.where(drop, self.net.num_classes, y)
        with self.amp:
            out, h = self.net((1 - tt) * zn + tt * noise, t, y, self.depth)
            rep = align.alignment_loss(self.proj, h, target, self.gamma)
        denoise = ((out.float() - (noise - zn)) ** 2).mean(dim=(1, 2, 3)).mean()
        loss = denoise + self.coeff * rep
        norm = self.update(self.opt, loss)
        self.update_ema()
        logs = (loss, denoise, rep, norm, vae_loss, rec, perceptual, kl, gan, vae_align,
                norm_vae, d_loss, norm_disc, real.mean(), fake.mean())
        return {k: v.detach() for k, v in zip(LOGGED, logs)}

    def compile(self):
        # as the official compiles its SiT, VAE and losses; in place: the same state_dict keys
        for m in (self.net, self.vae.encoder, self.vae.decoder, self.lpips, self.disc):
            m.compile(dynamic=False)
        self.hidden = torch.compile(self.hidden, dynamic=False)  # a graph that outputs h alone

    @torch.no_grad()
    def update_ema(self):
        # every SiT parameter and the BatchNorm's statistics (official update_ema)
        live = [*self.net.parameters(), self.bn.running_mean, self.bn.running_var]
        ema = [*self.ema_net.parameters(), self.ema_bn.running_mean, self.ema_bn.running_var]
        torch._foreach_lerp_(ema, live, 1 - self.decay)
        self.ema_bn.num_batches_tracked.copy_(self.bn.num_batches_tracked)
        sampling_vae(self.vae, self.ema_bn.state_dict())

    def parameters(self):  # train.py's check that the replicas agree
        return [p for m in (self.net, self.proj, self.vae, self.disc) for p in m.parameters()]

    def parts(self):
        # checkpoint key -> its object; model, ema, vae, discriminator, opt*: official
        return dict(model=self.net, proj=self.proj, ema=self.ema_net, bn=self.bn,
                    ema_bn=self.ema_bn, vae=self.vae, discriminator=self.disc,
                    opt=self.opt, opt_vae=self.opt_vae, opt_disc=self.opt_disc)


# -----------------------------------------------------------------------------
# train.py's side (its flags, the stage), the export, sample.py's side


def add_args(p):
    p.add_argument("--repae", action="store_true",
                   help="REPA-E: tune the SD-VAE end to end (repae.py)")
    p.add_argument("--repae-vgg", help="LPIPS's VGG16 file (timm's vgg16.tv_in1k or "
                   "torchvision's vgg16-397923af.pth), or 'random' (tests)")
    p.add_argument("--repae-lpips", help="LPIPS's linear layers (vgg.pth), or 'random'")
    p.add_argument("--repae-disc", help="a pretrained discriminator (the official "
                   "sdvae-f8d4-discriminator-ckpt.pt); default: random init")
    p.add_argument("--vae-lr", type=float, default=1e-4, help="REPA-E: the VAE's lr")
    p.add_argument("--disc-lr", type=float, default=1e-4, help="REPA-E: discriminator's lr")
    p.add_argument("--vae-align-coeff", type=float, default=1.5,
                   help="REPA-E: weight of the alignment loss in the VAE's update")


def build(args, net, projector, vae):
    if vae.encoder is None:
        raise RuntimeError(f"REPA-E trains the VAE's encoder: --vae-weights "
                           f"{args.vae_weights} is a decoder-only file")
    device = vae.latent_scale.device
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    lpips = load_lpips(args.repae_vgg, args.repae_lpips)
    disc = load_discriminator(args.repae_disc)
    return Stage(net, projector, vae, lpips.to(device), disc.to(device),
                 align_depth=args.encoder_depth, gamma=args.spnorm_gamma,
                 coeff=args.proj_coeff, vae_coeff=args.vae_align_coeff, lr=args.lr,
                 vae_lr=args.vae_lr, disc_lr=args.disc_lr, ema_decay=args.ema[0], amp=amp)


def export(ckpt, out):
    """As the official save_vae_weights.py: the VAE -> `out` (diffusers' names, for
    --vae-weights), the EMA BatchNorm's statistics beside it (--vae-stats); their path."""
    path, ck = readable_checkpoint(ckpt, "--ckpt")
    if "vae" not in ck:
        raise ValueError(f"{path} is not a REPA-E checkpoint (it holds no VAE)")
    stats = os.path.splitext(out)[0] + "-latents-stats.pt"
    if os.path.exists(out) or os.path.exists(stats):  # nothing made is overwritten
        raise ValueError(f"--out {out} or {stats} exists already: pass another --out")
    for state, file in ((dict(ck["vae"]), out), (latent_stats(ck["ema_bn"]), stats)):
        torch.save(state, file + ".tmp")
        os.replace(file + ".tmp", file)  # whole or absent
    return stats


def tuned_vae(vae_state, bn_state):
    """A REPA-E checkpoint's VAE, scaled by its EMA BatchNorm (for sample.py)."""
    return sampling_vae(encoders.VAE().load_diffusers(vae_state), bn_state)


if __name__ == "__main__":
    p = Parser("REPA-E's tuned VAE, exported for --vae-weights and --vae-stats")
    p.add_argument("command", choices=["export"])
    p.add_argument("--ckpt", required=True, help="a REPA-E run folder or checkpoint")
    p.add_argument("--out", required=True, help="the VAE file to write (e2e-vae.pt)")
    a = p.parse_args()
    try:
        stats_file = export(a.ckpt, a.out)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    print(f"wrote {a.out}, {stats_file}: use --vae-weights {a.out} --vae-stats {stats_file}")
