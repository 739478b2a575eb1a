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

import sde


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
    efficient: bool = False               # Imagen's Efficient U-Net (see UNet) [Imagen App. B.1]
    late_widen: bool = False              # ADM layout: a level's encoder blocks keep the channels
                                          #   of the level above; its down conv widens them, and the
                                          #   decoder's up conv narrows them back (imagen-pytorch)
    shared_kv: bool = False               # attention with one shared key / value head
                                          #   (imagen-pytorch)

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


# Named configs. The paper's three models (imagen-pytorch as the authors configured it).
CONFIGS = {
    # 64 px base model, ~410 M parameters in the paper; imagen's plain U-Net: encoder blocks at the
    # level above's channels, multi-query attention.
    "paper64": UNetConfig(width=256, mults=(1, 2, 3, 4), blocks=3, attn=(False, True, True, True),
                          late_widen=True,
                          shared_kv=True),
    # 64 -> 256 super-resolution model, ~300 M; memory-efficient (the authors' setting).
    "paper256": UNetConfig(width=128, mults=(1, 2, 4, 8), blocks=2,
                           attn=(False, False, False, True), efficient=True),
    # 256 -> 1024 super-resolution model, ~690 M; no attention; memory-efficient (the authors').
    "paper1024": UNetConfig(width=128, mults=(1, 2, 4, 8), blocks=(2, 4, 6, 8),
                            attn=(False,) * 4, efficient=True),
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
    """Sinusoidal features of the log-SNR. lam in [-LAM_CLAMP, LAM_CLAMP] = [-30, 30] is mapped to
    [0, 1500] so the usual frequencies (periods 1 .. 10000) resolve it like a DDPM timestep.
    (B,) -> (B, dim)"""
    c = (lam.float() + sde.LAM_CLAMP) * 25.0
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=lam.device) / half)
    args = c[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the autocast, output float32: what CUDA's autocast
    does by itself (group_norm is on its fp32 list) made explicit, so that CPU autocast, which
    would run it in bf16, agrees [guided-diffusion's GroupNorm32]. Same weights as nn.GroupNorm."""

    def forward(self, x):
        if not torch.amp.is_autocast_available(x.device.type):  # e.g. the meta device
            return super().forward(x.float())
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def norm(ch, groups):
    return GroupNorm32(math.gcd(groups, ch), ch)


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
    """Multi-head self-attention over the H*W positions, residual. shared_kv: one key / value
    head shared by all query heads (multi-query attention, as imagen-pytorch's U-Net)."""

    def __init__(self, ch, head_dim, groups, shared_kv=False):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.kv_heads = 1 if shared_kv else self.heads
        d = ch // self.heads
        self.norm, self.out = norm(ch, groups), nn.Conv2d(ch, ch, 1)
        self.qkv = nn.Conv2d(ch, ch + 2 * self.kv_heads * d, 1)  # q, then k, then v
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        d = C // self.heads
        qkv = self.qkv(self.norm(x))
        q = qkv[:, :C].reshape(B, self.heads, d, H * W)                     # (B, heads, d, HW)
        k, v = qkv[:, C:].reshape(B, 2, self.kv_heads, d, H * W).unbind(1)  # (B, kv_heads, d, HW)
        k, v = k.expand(B, self.heads, d, H * W), v.expand(B, self.heads, d, H * W)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                           v.transpose(-1, -2))
        return x + self.out(h.transpose(-1, -2).reshape(B, C, H, W))


class Block(nn.ModuleList):
    """A ResBlock, then self-attention or nothing: block(h, emb). (A ModuleList, so the weights
    keep the names [0] and [1] that saved models use.)"""

    def forward(self, h, emb):
        return self[1](self[0](h, emb))


TAKES_EMB = (ResBlock, Block)  # the layers called as layer(h, emb); every other one as layer(h)


def pixel_down(cin, cout):
    """Efficient layout: halve the resolution losslessly (pixel unshuffle: 2x2 pixels -> 4x the
    channels), then a 1x1 convolution to the level's channels. (B, C, H, W) -> (B, C', H/2, W/2)"""
    return nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4 * cin, cout, 1))


def pixel_up(cin, cout):
    """Efficient layout: a 1x1 convolution to 4x the channels at the low resolution, then pixel
    shuffle doubles it; no 3x3 convolution at the high resolution.
    (B, C, H, W) -> (B, C', 2H, 2W)"""
    return nn.Sequential(nn.Conv2d(cin, 4 * cout, 1), nn.PixelShuffle(2))


def conv_down(cin, cout):
    """ADM: halve the resolution, a stride-2 3x3 convolution. (B, C, H, W) -> (B, C', H/2, W/2)"""

    return nn.Conv2d(cin, cout, 3, stride=2, padding=1)


def conv_up(cin, cout):
    """ADM: nearest-neighbour upsampling, then a 3x3 convolution. (B, C, H, W) -> (B, C', 2H, 2W)"""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                         nn.Conv2d(cin, cout, 3, padding=1))


class UNet(nn.Module):
    """Three layouts of the same blocks (encoder, middle, decoder; skips from every encoder output):
    ADM [DDPM, ADM] (the default): each level runs its Blocks at its resolution, then a stride-2
      conv halves it; the decoder upsamples (nearest + 3x3 conv) and runs its Blocks.
    Imagen's plain U-Net (late_widen; the authors' 64 px base model): as ADM, but a level's
      encoder Blocks keep the channels of the level above, its down conv widens them, and the
      decoder's up conv narrows them back.
    Efficient U-Net [Imagen App. B.1] (efficient; the authors' 256 and 1024 px models): full
      resolution holds only the input conv, one ResBlock in and one out; every level first halves
      the resolution (pixel_down), then runs its Blocks, so it works one octave lower (about 1/4
      of the FLOPs at the same channels); the decoder upsamples with pixel_up at low resolution."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        w, g, emb_dim = cfg.width, cfg.groups, 4 * cfg.width
        mlp = lambda: nn.Sequential(nn.Linear(w, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.emb = mlp()  # of the noise level lam
        self.aug_emb = mlp() if cfg.aug_emb else None  # of the augmentation level aug_lam
        self.conv_in = nn.Conv2d(cfg.img_ch + cfg.cond_ch, w, 3, padding=1)
        chans, ch = [w * m for m in cfg.mults], w
        # Encoder: every output is kept for a skip (and the input conv's).
        self.down, skip_ch = nn.ModuleList(), [w]
        self.in_block = self.res(w, w) if cfg.efficient else None
        encoder = self.efficient_encoder if cfg.efficient else self.adm_encoder
        for lvl, cout in enumerate(chans):
            ch = encoder(lvl, ch, cout, skip_ch)
        # Middle: ResBlock, attention (if the lowest level has it), ResBlock; late_widen first
        # widens to the last level's channels (a 3x3 conv at the same resolution).
        widen = [nn.Conv2d(ch, chans[-1], 3, padding=1)] if ch != chans[-1] else []
        ch = chans[-1]
        self.mid = nn.ModuleList(widen + [self.res(ch, ch),
                                          self.attn(ch, len(chans) - 1), self.res(ch, ch)])
        # Decoder: per level one Block more than the encoder, each eating one skip.
        self.up = nn.ModuleList()
        decoder = self.efficient_decoder if cfg.efficient else self.adm_decoder
        for lvl in reversed(range(len(chans))):
            ch = decoder(lvl, ch, chans, skip_ch)
        self.out_block = self.res(ch + skip_ch.pop(), w) if cfg.efficient else None
        self.out = nn.Sequential(norm(w if cfg.efficient else ch, g), nn.SiLU(),
                                 nn.Conv2d(w if cfg.efficient else ch, cfg.img_ch, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # zero output at init [ADM]
        nn.init.zeros_(self.out[-1].bias)

    # The pieces each layout is built of. `ch` is the running channel count; each returns it.
    def res(self, cin, cout):
        return ResBlock(cin, cout, 4 * self.cfg.width, self.cfg.dropout, self.cfg.groups)

    def attn(self, ch, lvl):
        cfg = self.cfg
        return Attention(ch, cfg.head_dim,
                         cfg.groups, cfg.shared_kv) if cfg.attn[lvl] else nn.Identity()

    def block(self, cin, cout, lvl):
        return Block([self.res(cin, cout), self.attn(cout, lvl)])

    def adm_encoder(self, lvl, ch, cout, skip_ch):
        """ADM level: the Blocks at this resolution (late_widen: at the level above's channels),
        then conv_down (not after the lowest level)."""
        width = ch if self.cfg.late_widen else cout
        for _ in range(self.cfg.per_level_blocks()[lvl]):
            self.down.append(self.block(ch, width, lvl))
            ch = width
            skip_ch.append(ch)
        if lvl < len(self.cfg.mults) - 1:
            self.down.append(conv_down(ch, cout))
            ch = cout
            skip_ch.append(ch)
        return ch

    def efficient_encoder(self, lvl, ch, cout, skip_ch):
        """Efficient level: pixel_down first, then the Blocks one octave lower."""
        self.down.append(pixel_down(ch, cout))
        skip_ch.append(cout)
        for _ in range(self.cfg.per_level_blocks()[lvl]):
            self.down.append(self.block(cout, cout, lvl))
            skip_ch.append(cout)
        return cout

    def adm_decoder(self, lvl, ch, chans, skip_ch):
        """ADM level: Blocks eating skips, then conv_up (late_widen: narrowing to the level
        above's channels, as imagen-pytorch)."""
        for _ in range(self.cfg.per_level_blocks()[lvl] + 1):
            self.up.append(self.block(ch + skip_ch.pop(), chans[lvl], lvl))
            ch = chans[lvl]
        if lvl > 0:
            cout = chans[lvl - 1] if self.cfg.late_widen else ch
            self.up.append(conv_up(ch, cout))
            ch = cout
        return ch

    def efficient_decoder(self, lvl, ch, chans, skip_ch):
        """Efficient level: Blocks eating skips, then pixel_up to the level above's channels."""
        for _ in range(self.cfg.per_level_blocks()[lvl] + 1):
            self.up.append(self.block(ch + skip_ch.pop(), chans[lvl], lvl))
            ch = chans[lvl]
        cout = chans[lvl - 1] if lvl > 0 else self.cfg.width
        self.up.append(pixel_up(ch, cout))
        return cout

    def forward(self, x, lam, cond=None, aug_lam=None):
        """x: (B, img_ch, H, W) noisy image, H and W divisible by 2^(levels-1) (efficient:
        2^levels). lam: (B,) log-SNR of x. cond: (B, cond_ch, H, W) or None when cond_ch = 0.
        aug_lam: (B,) log-SNR of the conditioning augmentation; None = no augmentation.
        Returns the prediction (v_hat or eps_hat) (B, img_ch, H, W)."""
        cfg = self.cfg
        f = 2 ** (len(cfg.mults) - (0 if cfg.efficient else 1))
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"U-Net input {tuple(x.shape[-2:])} is not divisible by {f}")
        run = lambda layer, h: layer(h, emb) if isinstance(layer, TAKES_EMB) else layer(h)
        # Embedding of the noise level (and of the augmentation level; clean when not given).
        emb = self.emb(noise_embedding(lam, cfg.width))
        if self.aug_emb is not None:
            aug_lam = torch.full_like(lam, sde.LAM_CLAMP) if aug_lam is None else aug_lam
            emb = emb + self.aug_emb(noise_embedding(aug_lam, cfg.width))
        emb = emb.to(x.dtype)
        # Encoder.
        h = self.conv_in(torch.cat([x, cond.to(x.dtype)], dim=1) if cfg.cond_ch else x)
        skips = [h]
        if self.in_block is not None:  # efficient: the one full-resolution ResBlock in
            h = self.in_block(h, emb)
        for layer in self.down:
            h = run(layer, h)
            skips.append(h)
        # Middle.
        for layer in self.mid:
            h = run(layer, h)
        # Decoder.
        for layer in self.up:
            h = run(layer, torch.cat([h, skips.pop()], dim=1) if isinstance(layer, Block) else h)
        if self.out_block is not None:  # efficient: the one full-resolution ResBlock out
            h = self.out_block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def count_params(cfg: UNetConfig):
    """Parameter count of a config, built on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in UNet(cfg).parameters())


def flops(cfg: UNetConfig, size, backward=False):
    """FLOP of one image through `cfg` at size x size, forward (or forward + backward), counted by
    torch.utils.flop_counter on the meta device (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        net = UNet(cfg)
        x = torch.zeros(1, 3, size, size, requires_grad=backward)
        cond = torch.zeros(1, cfg.cond_ch, size, size) if cfg.cond_ch else None
        lam = torch.zeros(1)
        with FlopCounterMode(display=False) as fc:
            out = net(x, lam, cond, lam)
            if backward:
                out.sum().backward()
    return fc.get_total_flops()
