"""The U-Net of every URCDM level: a hand-written DDPM / Imagen style network.

Input channels are concatenated: x_t (img_ch), then the conditioning (cond_ch: the
upsampled previous-level image, and for stages 2-3 the context and region crops). The
network is conditioned on the noise level as a log-SNR `lam` (never on a step index, so
the number of sampling steps can change after training) and, optionally, on the
conditioning-augmentation level `aug_lam` through a second embedding.

References
  [DDPM]    Ho et al., Denoising diffusion probabilistic models, 2020 (ResBlock U-Net).
  [ADM]     Dhariwal & Nichol, Diffusion models beat GANs, 2021 (scale-shift norm,
            attention at low resolution, zero-initialised output).
  [Imagen]  Saharia et al., 2022; imagen-pytorch (the paper's model sizes, docs/design.md).
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class UNetConfig:
    width: int = 64                       # channels at the first resolution level
    mults: tuple = (1, 2, 4, 8)           # channel multiplier per resolution level
    blocks: object = 2                    # ResBlocks per level: int, or one int per level
    attn: tuple = (False, False, False, True)  # self-attention per level
    head_dim: int = 64                    # channels per attention head
    dropout: float = 0.0
    img_ch: int = 3                       # channels of x_t and of the output v_hat
    cond_ch: int = 0                      # extra conditioning channels concatenated to x_t
    aug_emb: bool = False                 # second embedding for the cond. augmentation level
    groups: int = 32                      # GroupNorm groups (capped by the channel count)

    def __post_init__(self):
        self.mults, self.attn = tuple(self.mults), tuple(bool(a) for a in self.attn)
        if not isinstance(self.blocks, int):
            self.blocks = tuple(self.blocks)
        if len(self.attn) != len(self.mults) or len(self.per_level_blocks()) != len(self.mults):
            raise ValueError("UNetConfig: mults, attn and blocks need one entry per level")

    def per_level_blocks(self):
        return (self.blocks,) * len(self.mults) if isinstance(self.blocks, int) else self.blocks

    def to_dict(self):
        return asdict(self)


# Named configs. The paper's three models (imagen-pytorch defaults used by the authors).
CONFIGS = {
    # 64 px base model, ~410 M parameters in the paper.
    "paper64": UNetConfig(width=256, mults=(1, 2, 3, 4), blocks=3, attn=(False, True, True, True)),
    # 64 -> 256 super-resolution model, ~300 M.
    "paper256": UNetConfig(width=128, mults=(1, 2, 4, 8), blocks=2, attn=(False, False, False, True)),
    # 256 -> 1024 super-resolution model, ~690 M; no attention at high resolution.
    "paper1024": UNetConfig(width=128, mults=(1, 2, 4, 8), blocks=(2, 4, 6, 8), attn=(False,) * 4),
    # Small models for the CPU demo and for tests.
    "demo": UNetConfig(width=32, mults=(1, 2, 2), blocks=1, attn=(False, False, True), head_dim=32),
    "demo_base": UNetConfig(width=32, mults=(1, 2), blocks=1, attn=(False, True), head_dim=32),
    "tiny": UNetConfig(width=16, mults=(1, 2), blocks=1, attn=(False, True), head_dim=16, groups=8),
}


def get_config(name, **overrides):
    """A copy of a named config with fields replaced, e.g. get_config('tiny', cond_ch=6)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown U-Net config {name!r}; choose one of {sorted(CONFIGS)}")
    return UNetConfig(**{**CONFIGS[name].to_dict(), **overrides})


def noise_embedding(lam, dim):
    """Sinusoidal features of the log-SNR. lam in about [-30, 30] is mapped to [0, 1500] so
    the usual frequencies (periods 1 .. 10000) resolve it like a DDPM timestep. (B,) -> (B, dim)"""
    c = (lam.float() + 30.0) * 25.0
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=lam.device) / half)
    args = c[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def norm(ch, groups):
    return nn.GroupNorm(math.gcd(groups, ch), ch)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, scale-shift from the embedding, GroupNorm-SiLU-dropout-conv. [ADM]"""

    def __init__(self, cin, cout, emb_dim, dropout, groups):
        super().__init__()
        self.norm1, self.conv1 = norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, emb):  # x (B, cin, H, W), emb (B, emb_dim)
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h  # (B, cout, H, W)


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual."""

    def __init__(self, ch, head_dim, groups):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm, self.qkv, self.out = norm(ch, groups), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, emb=None):  # (B, C, H, W); emb unused
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(h.transpose(-1, -2).reshape(B, C, H, W))


class NoAttention(nn.Identity):
    def forward(self, x, emb=None):
        return x


class Block(nn.ModuleList):
    """A ResBlock, then self-attention or nothing: block(h, emb). (A ModuleList, so the weights
    keep the names [0] and [1] that saved models use.)"""

    def forward(self, h, emb):
        return self[1](self[0](h, emb))


class Down(nn.Conv2d):
    """Halve the resolution: a 3x3 convolution with stride 2. (B, C, H, W) -> (B, C, H/2, W/2)"""

    def forward(self, h, emb=None):
        return super().forward(h)


class Up(nn.Sequential):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 convolution."""

    def forward(self, h, emb=None):
        return super().forward(h)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        w, g, emb_dim = cfg.width, cfg.groups, 4 * cfg.width
        self.emb = nn.Sequential(nn.Linear(w, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.aug_emb = (nn.Sequential(nn.Linear(w, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                        if cfg.aug_emb else None)
        self.conv_in = nn.Conv2d(cfg.img_ch + cfg.cond_ch, w, 3, padding=1)
        chans = [w * m for m in cfg.mults]
        nblocks = cfg.per_level_blocks()
        attn = lambda ch, on: Attention(ch, cfg.head_dim, g) if on else NoAttention()
        block = lambda cin, cout, on: Block([ResBlock(cin, cout, emb_dim, cfg.dropout, g), attn(cout, on)])

        # Encoder: per level `blocks` Blocks, then a Down; every output is kept for a skip.
        self.down, skip_ch, ch = nn.ModuleList(), [w], w
        for lvl, (cout, nb) in enumerate(zip(chans, nblocks)):
            for _ in range(nb):
                self.down.append(block(ch, cout, cfg.attn[lvl]))
                ch = cout
                skip_ch.append(ch)
            if lvl < len(chans) - 1:
                self.down.append(Down(ch, ch, 3, stride=2, padding=1))
                skip_ch.append(ch)
        # Middle: ResBlock, attention (if the lowest level has it), ResBlock.
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, cfg.dropout, g), attn(ch, cfg.attn[-1]),
                                  ResBlock(ch, ch, emb_dim, cfg.dropout, g)])
        # Decoder: per level one Block more than the encoder, each eating one skip, then an Up.
        self.up = nn.ModuleList()
        for lvl in reversed(range(len(chans))):
            for _ in range(nblocks[lvl] + 1):
                self.up.append(block(ch + skip_ch.pop(), chans[lvl], cfg.attn[lvl]))
                ch = chans[lvl]
            if lvl > 0:
                self.up.append(Up(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)))
        self.out = nn.Sequential(norm(ch, g), nn.SiLU(), nn.Conv2d(ch, cfg.img_ch, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # zero output at init [ADM]
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, lam, cond=None, aug_lam=None):
        """x: (B, img_ch, H, W) noisy image, H and W divisible by 2^(levels-1).
        lam: (B,) log-SNR of x. cond: (B, cond_ch, H, W) or None when cond_ch = 0.
        aug_lam: (B,) log-SNR of the conditioning augmentation; None = no augmentation.
        Returns the prediction (v_hat or eps_hat) (B, img_ch, H, W)."""
        cfg = self.cfg
        f = 2 ** (len(cfg.mults) - 1)
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"U-Net input {tuple(x.shape[-2:])} is not divisible by {f}")
        # Embedding of the noise level (and of the augmentation level).
        emb = self.emb(noise_embedding(lam, cfg.width))
        if self.aug_emb is not None:
            aug_lam = torch.full_like(lam, 30.0) if aug_lam is None else aug_lam  # 30 = clean
            emb = emb + self.aug_emb(noise_embedding(aug_lam, cfg.width))
        emb = emb.to(x.dtype)
        # Encoder.
        h = self.conv_in(torch.cat([x, cond.to(x.dtype)], dim=1) if cfg.cond_ch else x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        # Middle.
        for block in self.mid:
            h = block(h, emb)
        # Decoder.
        for block in self.up:
            if isinstance(block, Block):
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        return self.out(h)


def count_params(cfg: UNetConfig):
    """Parameter count of a config, built on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in UNet(cfg).parameters())
