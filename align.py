"""
REPA and iREPA side by side: the whole method on one screen.

REPA (Yu et al. 2024): hidden tokens h (B, T, D) of the diffusion transformer after block
`encoder_depth` go through a projector and are pulled towards the frozen encoder's patch tokens
z (B, T, Dz) of the clean image by maximising their per-token cosine similarity.
iREPA (Singh et al. 2025, arXiv 2512.10794, Sec. 4) changes two things, because what transfers is
the encoder's *spatial structure* (how patch similarity falls with distance), not global semantics:
  1. a 3x3 convolution over the token grid replaces the per-token MLP projector;
  2. the target tokens are spatially normalised per image and channel, removing most of the
     component shared by all tokens (which carries global information, not structure).
Everything else is REPA. `grep -n iREPA align.py` prints every line of the change.

    python align.py      # prints both methods' defaults and projector sizes
"""
import argparse
import math

import torch.nn as nn
import torch.nn.functional as F

# Paper defaults per model family (SiT: latent space, JiT: pixel space).
# The official LDM script's --proj-kwargs-kernel-size defaults to 1 and its iREPA config never sets
# it, so the official SiT "iREPA" run trains a 1x1 conv; the paper says 3x3. We use 3 everywhere.
REPA = {"SiT": dict(proj="mlp", gamma=None, coeff=0.5),
        "JiT": dict(proj="mlp", gamma=None, coeff=0.5)}
IREPA = {"SiT": dict(proj="conv", gamma=0.6, coeff=1.0),  # iREPA
         "JiT": dict(proj="conv", gamma=0.8, coeff=0.5)}  # iREPA
PROJ_KERNEL = 3                                            # iREPA: 3x3 conv (Sec. 4)


def encoder_depth_default(model_name):
    """The block after which tokens are aligned: 4 for base models, 8 for larger ones."""
    return 4 if model_name.split("-")[1].split("/")[0] in ("S", "B", "demo") else 8


class MLPProjector(nn.Module):
    """REPA: the same 3-layer MLP on every token independently, (B, T, D) -> (B, T, Dz)."""

    def __init__(self, d_model, d_enc, width=2048):
        super().__init__()
        self.projection_layer = nn.Sequential(nn.Linear(d_model, width), nn.SiLU(),
                                              nn.Linear(width, width), nn.SiLU(),
                                              nn.Linear(width, d_enc))
        for m in self.projection_layer:  # the official init (Xavier, zero bias) reaches it too
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, h):
        return self.projection_layer(h)


class ConvProjector(nn.Module):
    """iREPA: a 3x3 conv on the square token grid, so each projected token sees its neighbours."""

    def __init__(self, d_model, d_enc, kernel=PROJ_KERNEL):
        super().__init__()
        self.projection_layer = nn.Conv2d(d_model, d_enc, kernel, padding=kernel // 2)  # iREPA

    def forward(self, h):
        B, T, D = h.shape
        g = math.isqrt(T)                                           # iREPA: side of the square grid
        x = h.transpose(1, 2).reshape(B, D, g, g)                   # iREPA: tokens -> (B, D, g, g)
        return self.projection_layer(x).flatten(2).transpose(1, 2)  # iREPA: back to (B, T, Dz)


def make_projector(d_model, d_enc, conv):
    return ConvProjector(d_model, d_enc) if conv else MLPProjector(d_model, d_enc)  # iREPA: conv


def spatial_norm(z, gamma):
    """iREPA spatial normalisation of the target tokens z (B, T, Dz), per image and channel over T:
    (z - gamma * mean_T z) / (std_T z + 1e-6), torch.std (unbiased), always in fp32."""
    z = z.float()                                               # iREPA
    return (z - gamma * z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + 1e-6)  # iREPA


def repa_loss(h_proj, z):
    """Mean over batch and tokens of -cos(projected hidden token, target token). Both (B, T, Dz)."""
    if h_proj.shape != z.shape:
        raise ValueError(f"token shapes differ: {tuple(h_proj.shape)} vs {tuple(z.shape)}")
    return -(F.normalize(h_proj.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(-1).mean()


def alignment_loss(projector, h, z, gamma):
    """The REPA term of the training loss; gamma=None is plain REPA."""
    if gamma is not None:
        z = spatial_norm(z, gamma)                              # iREPA
    return repa_loss(projector(h), z)


if __name__ == "__main__":
    argparse.ArgumentParser(description="REPA's and iREPA's defaults, projector sizes").parse_args()
    for fam in ("SiT", "JiT"):
        print(f"{fam}: REPA {REPA[fam]}  iREPA {IREPA[fam]}")
    for conv in (False, True):
        p = make_projector(768, 768, conv)
        n = sum(q.numel() for q in p.parameters())
        print(f"{type(p).__name__}(768 -> 768): {n:,} parameters")
