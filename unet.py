"""The U-Net of every URCDM level: hand-written DDPM / Imagen style networks.

Input channels are concatenated: x_t (img_ch), then the conditioning (cond_ch: the upsampled
previous-level image, and for stages 2-3 the context and region crops). The network is
conditioned on the noise level as a log-SNR `lam` (never on a step index, so the number of
sampling steps can change after training: distilled students sample at 2-4) and, optionally, on
the conditioning-augmentation level `aug_lam` through a second embedding.

Two networks. `UNet` first: ADM's layout, or Imagen's Efficient U-Net (`efficient`); the demo's
models and paper_plus's, and the one to read and to train on a CPU. Then, below a banner that a
first reading skips, `ImagenUNet`: imagen-pytorch's Unet piece by piece as the authors configured
it (`paper`: their parameters within 1 %, their FLOPs, their outputs from their weights:
tests/bench_flops.py, tests/test_unet.py). `build(cfg)` makes either.

References
  [DDPM]    Ho et al., Denoising diffusion probabilistic models, 2020 (ResBlock U-Net).
  [ADM]     Dhariwal & Nichol, Diffusion models beat GANs, 2021 (scale-shift norm,
            attention at low resolution, zero-initialised output).
  [Imagen]  Saharia et al., 2022 (Efficient U-Net, App. B.1); lucidrains' imagen-pytorch 1.26
            (the authors' U-Net: cross-embed stem, global context, multi-query cosine-sim
            attention, time tokens; docs/design.md).
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
    groups: int = 32                      # GroupNorm groups (capped by the channel count);
                                          #   paper's: 8, imagen-pytorch's
    efficient: bool = False               # Imagen's Efficient U-Net (see UNet) [Imagen App. B.1]:
                                          #   the 256 and 1024 px models of paper_plus and paper
    # The switches below serve `paper` alone: the authors' network, ImagenUNet.
    imagen: bool = False                  # imagen-pytorch's Unet block for block (ImagenUNet)
    cross_attn: tuple = None              # per level, the first ResBlock also attends to the
                                          #   noise-level tokens (no text: its cross-attention)
    heads: int = 8                        # attention heads (of head_dim channels each)
    init_residual: bool = False           # the input conv's output re-enters before the last
                                          #   ResBlock (init_conv_to_final_conv_residual)

    def __post_init__(self):
        self.mults, self.attn = tuple(self.mults), tuple(bool(a) for a in self.attn)
        self.cross_attn = tuple(bool(a) for a in (self.cross_attn or (False,) * len(self.mults)))
        if not isinstance(self.blocks, int):
            self.blocks = tuple(self.blocks)
        if any(len(t) != len(self.mults) for t in (self.attn, self.cross_attn,
                                                   self.per_level_blocks())):
            raise ValueError("UNetConfig: mults, attn, cross_attn and blocks need one entry per "
                             "level")

    def per_level_blocks(self):
        return (self.blocks,) * len(self.mults) if isinstance(self.blocks, int) else self.blocks

    def to_dict(self):
        return asdict(self)


# Named configs.
CONFIGS = {
    # The paper's three models: the authors' imagen-pytorch U-Nets, setting for setting from their
    # scripts/train.py (ImagenUNet; `blocks` there counts the ResBlocks after a level's first).
    # 64 px base model: 410 M parameters (theirs 412.9 M with unused text-pooling weights).
    "paper64": UNetConfig(width=256, mults=(1, 2, 3, 4), blocks=3, attn=(False, True, True, True),
                          cross_attn=(False, True, True, True), groups=8, imagen=True),
    # 64 -> 256 super-resolution model (theirs 300.5 M); memory-efficient.
    "paper256": UNetConfig(width=128, mults=(1, 2, 4, 8), blocks=2,
                           attn=(False, False, False, True), cross_attn=(False, False, True, True),
                           groups=8, efficient=True, init_residual=True, imagen=True),
    # 256 -> 1024 super-resolution model (theirs 690.3 M); attention only in the middle.
    "paper1024": UNetConfig(width=128, mults=(1, 2, 4, 8), blocks=(2, 4, 6, 8), attn=(False,) * 4,
                            cross_attn=(False, False, False, True), groups=8, efficient=True,
                            init_residual=True, imagen=True),
    # deviation (paper_plus): leaner U-Nets of the same widths in UNet's layouts (GroupNorm 32, no
    # cross-attention, feed-forward, global context or middle attention in the 1024 px model, one
    # ResBlock fewer a level): 89 / 84 / 87 % of the authors' parameters at 93 / 90 / 93 % of their
    # FLOPs (tests/bench_flops.py).
    # 64 px: ADM, 2 ResBlocks a level, attention at the two lowest resolutions.
    "plus64": UNetConfig(width=256, mults=(1, 2, 3, 4), blocks=2, attn=(False, False, True, True)),
    # 64 -> 256 px, memory-efficient.
    "plus256": UNetConfig(width=128, mults=(1, 2, 4, 8), blocks=2,
                          attn=(False, False, False, True), efficient=True),
    # 256 -> 1024 px, no attention, memory-efficient.
    "plus1024": UNetConfig(width=128, mults=(1, 2, 4, 8), blocks=(2, 4, 6, 8),
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
    """Sinusoidal features of the log-SNR [DDPM's timestep embedding]. lam in [-30, 30]
    (sde.LAM_CLAMP) is mapped to [0, 1500], so the usual periods (1 .. 10000) resolve it like a
    DDPM timestep; a lam beyond the clamp still embeds (the map is affine).
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
    """GroupNorm-SiLU-conv, scale-shift from the embedding, GroupNorm-SiLU-dropout-conv [ADM]:
    the embedding of the noise level scales and shifts the normalised features, so every block
    knows how noisy its input is. imagen-pytorch's ResnetBlock adds two optional pieces, which
    ImagenUNet uses [Imagen]: `cross` (heads, head_dim, token_dim): after the first conv every
    pixel attends to the noise-level tokens; `gca`: the output is gated by a GlobalContext."""

    def __init__(self, cin, cout, emb_dim, dropout, groups, cross=None, gca=False):
        super().__init__()
        self.norm1, self.conv1 = norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.cross = TokenAttention(cout, *cross, cross=True) if cross else None
        self.gca = GlobalContext(cout) if gca else None
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, emb, tokens=None):  # x (B, cin, H, W), emb (B, emb_dim)
        h = self.conv1(F.silu(self.norm1(x)))
        if self.cross is not None:  # tokens (B, T, token_dim)
            h = h + on_pixels(self.cross, h, tokens)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        if self.gca is not None:
            h = h * self.gca(h)
        return self.skip(x) + h  # (B, cout, H, W)


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual."""

    def __init__(self, ch, head_dim, groups):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm, self.out = norm(ch, groups), nn.Conv2d(ch, ch, 1)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)  # q, then k, then v
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads,
                                                 H * W).unbind(1)  # each (B, heads, d, HW)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                           v.transpose(-1, -2))      # (B, heads, HW, d)
        return x + self.out(h.transpose(-1, -2).reshape(B, C, H, W))


class Block(nn.Module):
    """A ResBlock, then self-attention where the level has it [ADM]: block(h, emb)."""

    def __init__(self, res, attn=None):
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, h, emb):
        h = self.res(h, emb)
        return h if self.attn is None else self.attn(h)


def pixel_down(cin, cout):
    """Efficient layout: halve the resolution losslessly (pixel unshuffle: 2x2 pixels -> 4x the
    channels), then a 1x1 convolution to the level's channels. (B, C, H, W) -> (B, C', H/2, W/2)"""
    return nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4 * cin, cout, 1))


def pixel_up(cin, cout):
    """Efficient layout: a 1x1 convolution to 4x the channels at the low resolution, then pixel
    shuffle doubles it; no 3x3 convolution at the high one. (B, C, H, W) -> (B, C', 2H, 2W)"""
    return nn.Sequential(nn.Conv2d(cin, 4 * cout, 1), nn.PixelShuffle(2))


def conv_down(cin, cout):
    """ADM: halve the resolution, a stride-2 3x3 convolution. (B, C, H, W) -> (B, C', H/2, W/2)"""
    return nn.Conv2d(cin, cout, 3, stride=2, padding=1)


def conv_up(cin, cout):
    """ADM: nearest-neighbour upsampling, then a 3x3 convolution. (B, C, H, W) -> (B, C', 2H, 2W)"""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                         nn.Conv2d(cin, cout, 3, padding=1))


class UNet(nn.Module):
    """The demo's and paper_plus's U-Net: an encoder of resolution levels, a middle, a decoder that
    mirrors the encoder, with a skip from every encoder output to the decoder [DDPM, ADM].

    Level l of the encoder: `down` (halves the resolution; its output is a skip), then its Blocks
    at that resolution (each output a skip). Level l of the decoder (deepest first): one Block more
    than the encoder's, each eating the skip pushed last, then `up` (doubles the resolution).
    Two layouts of the same pieces:
      ADM [DDPM, ADM] (the default): level 0 has no `down` (the input conv's output is its first
        skip); a level's `down` is a stride-2 conv of the level above's channels (conv_down);
        the decoder's `up` is nearest + 3x3 conv (conv_up), none after level 0.
      Efficient U-Net [Imagen App. B.1] (efficient; the authors' 256 and 1024 px models): every
        level halves first, by pixel_down, so it works one octave lower (about 1/4 of the FLOPs at
        the same channels); the decoder's `up` is pixel_up, level 0's back to full resolution,
        where one ResBlock in (in_block) and one out (out_block, eating the input conv's skip)
        are all the network does."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        w, g, emb_dim = cfg.width, cfg.groups, 4 * cfg.width
        mlp = lambda: nn.Sequential(nn.Linear(w, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.emb = mlp()  # of the noise level lam
        self.aug_emb = mlp() if cfg.aug_emb else None  # of the augmentation level aug_lam
        self.conv_in = nn.Conv2d(cfg.img_ch + cfg.cond_ch, w, 3, padding=1)
        chans, blocks, eff = [w * m for m in cfg.mults], cfg.per_level_blocks(), cfg.efficient
        # Encoder: per level, `down`, then its Blocks; skip_ch: the channels of each skip.
        self.encoder, skip_ch, ch = nn.ModuleList(), [w], w
        for lvl, cout in enumerate(chans):
            down = pixel_down(ch, cout) if eff else (conv_down(ch, ch) if lvl else None)
            ch = cout if eff else ch
            skip_ch += [ch] if down is not None else []
            level = [self.block(ch if j == 0 else cout, cout, lvl) for j in range(blocks[lvl])]
            skip_ch += [cout] * blocks[lvl]
            self.encoder.append(Level(down, level, None))
            ch = cout
        self.in_block = self.res(w, w) if eff else None  # efficient: full resolution's ResBlock
        # Middle: ResBlock, attention (if the lowest level has it), ResBlock.
        self.mid = nn.ModuleList([self.res(ch, ch), self.attn(ch, len(chans) - 1),
                                  self.res(ch, ch)])
        # Decoder, deepest level first: Blocks eating the skips in reverse, then `up`.
        self.decoder = nn.ModuleList()
        for lvl in reversed(range(len(chans))):
            level = []
            for _ in range(blocks[lvl] + 1):
                level.append(self.block(ch + skip_ch.pop(), chans[lvl], lvl))
                ch = chans[lvl]
            cout = (chans[lvl - 1] if lvl else w) if eff else ch
            up = pixel_up(ch, cout) if eff else (conv_up(ch, ch) if lvl else None)
            self.decoder.append(Level(None, level, up))
            ch = cout
        self.out_block = self.res(ch + skip_ch.pop(), w) if eff else None
        self.out = nn.Sequential(norm(w if eff else ch, g), nn.SiLU(),
                                 nn.Conv2d(w if eff else ch, cfg.img_ch, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # zero output at init [ADM]
        nn.init.zeros_(self.out[-1].bias)

    def res(self, cin, cout):
        return ResBlock(cin, cout, 4 * self.cfg.width, self.cfg.dropout, self.cfg.groups)

    def attn(self, ch, lvl):
        cfg = self.cfg
        return Attention(ch, cfg.head_dim, cfg.groups) if cfg.attn[lvl] else nn.Identity()

    def block(self, cin, cout, lvl):
        cfg = self.cfg
        return Block(self.res(cin, cout),
                     Attention(cout, cfg.head_dim, cfg.groups) if cfg.attn[lvl] else None)

    def forward(self, x, lam, cond=None, aug_lam=None):
        """x: (B, img_ch, H, W) noisy image, H and W divisible by 2^(levels-1) (efficient:
        2^levels). lam: (B,) log-SNR of x. cond: (B, cond_ch, H, W) or None when cond_ch = 0.
        aug_lam: (B,) log-SNR of the conditioning augmentation; None = no augmentation.
        Returns the prediction (v_hat or eps_hat) (B, img_ch, H, W)."""
        cfg = self.cfg
        f = 2 ** (len(cfg.mults) - (0 if cfg.efficient else 1))
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"U-Net input {tuple(x.shape[-2:])} is not divisible by {f}")
        # Embedding of the noise level (and of the augmentation level; clean when not given).
        emb = self.emb(noise_embedding(lam, cfg.width))
        if self.aug_emb is not None:
            aug_lam = torch.full_like(lam, sde.LAM_CLAMP) if aug_lam is None else aug_lam
            emb = emb + self.aug_emb(noise_embedding(aug_lam, cfg.width))
        emb = emb.to(x.dtype)
        # Encoder: every output is kept for the decoder.
        h = self.conv_in(torch.cat([x, cond.to(x.dtype)], dim=1) if cfg.cond_ch else x)
        skips = [h]
        if self.in_block is not None:  # efficient: the one full-resolution ResBlock in
            h = self.in_block(h, emb)
        for level in self.encoder:
            if level.down is not None:
                h = level.down(h)
                skips.append(h)
            for block in level.blocks:
                h = block(h, emb)
                skips.append(h)
        # Middle.
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        # Decoder: each Block eats the skip pushed last.
        for level in self.decoder:
            for block in level.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if level.up is not None:
                h = level.up(h)
        if self.out_block is not None:  # efficient: the one full-resolution ResBlock out
            h = self.out_block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


class Level(nn.Module):
    """One resolution level of UNet: `down` (or None), its Blocks, `up` (or None)."""

    def __init__(self, down, blocks, up):
        super().__init__()
        self.down, self.blocks, self.up = down, nn.ModuleList(blocks), up


def build(cfg: UNetConfig):
    """The network of a config: UNet, or ImagenUNet (cfg.imagen, below)."""
    return ImagenUNet(cfg) if cfg.imagen else UNet(cfg)


# ==============================================================================================
# The authors' network (`paper`): imagen-pytorch's Unet (1.26), piece by piece. A first reading
# can stop here: UNet above is the same idea (a ResBlock U-Net on x_t and its conditioning,
# embedding the noise level) with fewer pieces. ResBlock's `cross` and `gca` serve this part only.
# ==============================================================================================

class TokenAttention(nn.Module):
    """imagen-pytorch's attention over tokens (B, N, dim) [Imagen]: `heads` query heads of
    head_dim channels. Self-attention (cross=False) has one key / value head shared by all
    (multi-query) and may also attend to extra tokens of token_dim channels; cross-attention
    (cross=True) takes keys and values from the tokens only, one head each. Both add a learned
    null key / value (a token that says "nothing here") and compare queries with keys by cosine
    similarity, with learned per-channel scales, at temperature 8."""

    def __init__(self, dim, heads, head_dim, token_dim=None, cross=False):
        super().__init__()
        self.heads, self.d, self.cross = heads, head_dim, cross
        self.kv_heads = heads if cross else 1
        self.norm = nn.LayerNorm(dim, bias=False)
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(token_dim if cross else dim, 2 * self.kv_heads * head_dim,
                               bias=False)
        self.to_tokens = (nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, 2 * head_dim))
                          if token_dim and not cross else None)
        self.null_kv = nn.Parameter(torch.randn(2, head_dim))
        self.q_scale, self.k_scale = (nn.Parameter(torch.ones(head_dim)) for _ in range(2))
        self.to_out = nn.Sequential(nn.Linear(heads * head_dim, dim, bias=False),
                                    nn.LayerNorm(dim, bias=False))

    def forward(self, x, tokens=None):  # x (B, N, dim), tokens (B, T, token_dim)
        B, N, _ = x.shape
        x = self.norm(x)
        q = self.to_q(x).view(B, N, self.heads, self.d).transpose(1, 2)     # (B, heads, N, d)
        kv = self.to_kv(tokens if self.cross else x)
        k, v = kv.view(B, -1, 2, self.kv_heads, self.d).permute(2, 0, 3, 1, 4)  # (B, kvh, M, d)
        null_k, null_v = (n.to(k.dtype).expand(B, self.kv_heads, 1, self.d) for n in self.null_kv)
        k, v = torch.cat([null_k, k], dim=2), torch.cat([null_v, v], dim=2)
        if self.to_tokens is not None and tokens is not None:
            tk, tv = self.to_tokens(tokens)[:, None].chunk(2, dim=-1)       # (B, 1, T, d)
            k, v = torch.cat([tk.to(k.dtype), k], dim=2), torch.cat([tv.to(v.dtype), v], dim=2)
        q = F.normalize(q, dim=-1) * self.q_scale.to(q.dtype)
        k = F.normalize(k, dim=-1) * self.k_scale.to(k.dtype)
        M = k.shape[2]
        k, v = k.expand(B, self.heads, M, self.d), v.expand(B, self.heads, M, self.d)
        h = F.scaled_dot_product_attention(q, k, v, scale=8.0)
        return self.to_out(h.transpose(1, 2).reshape(B, N, -1))


def on_pixels(layer, x, tokens=None):
    """Apply a token layer to the H*W pixels of x as tokens. (B, C, H, W) -> (B, C, H, W)"""
    B, C, H, W = x.shape
    return layer(x.flatten(2).transpose(1, 2), tokens).transpose(1, 2).reshape(B, C, H, W)


class TransformerBlock(nn.Module):
    """imagen's attention layer of a level: self-attention (also to the noise-level tokens when
    token_dim is given), then a feed-forward of twice the width, each residual."""

    def __init__(self, dim, heads, head_dim, token_dim=None):
        super().__init__()
        self.attn = TokenAttention(dim, heads, head_dim, token_dim)
        self.ff = nn.Sequential(nn.LayerNorm(dim, bias=False), nn.Linear(dim, 2 * dim, bias=False),
                                nn.GELU(), nn.LayerNorm(2 * dim, bias=False),
                                nn.Linear(2 * dim, dim, bias=False))

    def forward(self, x, tokens=None):
        def layer(t, tokens):  # t (B, HW, C)
            t = t + self.attn(t, tokens)
            return t + self.ff(t)
        return on_pixels(layer, x, tokens)


class GlobalContext(nn.Module):
    """imagen's gate, a squeeze-and-excitation with attention pooling: a softmax over the pixels
    pools the map into one vector; a small MLP makes a gate in (0, 1) per channel.
    (B, C, H, W) -> (B, C, 1, 1)"""

    def __init__(self, ch):
        super().__init__()
        hidden = max(3, ch // 2)
        self.to_k = nn.Conv2d(ch, 1, 1)
        self.net = nn.Sequential(nn.Conv2d(ch, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, ch, 1),
                                 nn.Sigmoid())

    def forward(self, x):
        weights = self.to_k(x).flatten(2).softmax(dim=-1)                   # (B, 1, HW)
        pooled = torch.einsum("bin,bcn->bci", weights, x.flatten(2))         # (B, C, 1)
        return self.net(pooled[..., None])


class CrossEmbed(nn.Module):
    """imagen's input conv: 3x3, 7x7 and 15x15 convolutions side by side (half, a quarter and a
    quarter of the channels), concatenated: several receptive fields from the first layer."""

    def __init__(self, cin, cout, kernels=(3, 7, 15)):
        super().__init__()
        chans = [cout // 2, cout // 4]
        chans.append(cout - sum(chans))
        self.convs = nn.ModuleList(nn.Conv2d(cin, c, k, padding=k // 2)
                                   for k, c in zip(kernels, chans))

    def forward(self, x):
        return torch.cat([conv(x) for conv in self.convs], dim=1)


class ConvPair(nn.Module):
    """imagen's plain U-Net, last level: a 3x3 and a 1x1 convolution, summed (no downsampling)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv3, self.conv1 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.conv3(x) + self.conv1(x)


def shuffle_up(cin, cout):
    """imagen's PixelShuffleUpsample: 1x1 conv to 4x the channels, SiLU, pixel shuffle; each
    weight drawn once for the 4 sub-pixels, so it starts as a nearest upsampling (ICNR init)."""
    conv = nn.Conv2d(cin, 4 * cout, 1)
    with torch.no_grad():
        conv.weight.copy_(nn.init.kaiming_uniform_(torch.empty(cout, cin, 1, 1))
                          .repeat_interleave(4, dim=0))
        conv.bias.zero_()
    return nn.Sequential(conv, nn.SiLU(), nn.PixelShuffle(2))


class NoiseLevel(nn.Module):
    """imagen's time conditioning: lam and sin, cos of 2 pi w lam for features / 2 learned
    frequencies w (its LearnedSinusoidalPosEmb, fed the log-SNR as imagen's get_condition gives
    it) -> hidden (emb_dim) -> the ResBlocks' embedding, and `n` tokens of `width` channels that
    attention layers attend to. (UNet keeps ADM's fixed features: the demo was trained so.)"""

    def __init__(self, width, emb_dim, n=2, features=16):
        super().__init__()
        self.width, self.n = width, n
        self.freqs = nn.Parameter(torch.randn(features // 2))                # w
        self.hidden = nn.Sequential(nn.Linear(features + 1, emb_dim), nn.SiLU())
        self.to_emb = nn.Linear(emb_dim, emb_dim)
        self.to_tokens = nn.Linear(emb_dim, n * width)

    def forward(self, lam):  # (B,) -> (B, emb_dim), (B, n, width)
        lam1 = lam.float()[:, None]
        angles = 2 * math.pi * lam1 * self.freqs[None]                       # (B, features / 2)
        hidden = self.hidden(torch.cat([lam1, angles.sin(), angles.cos()], dim=1))
        return self.to_emb(hidden), self.to_tokens(hidden).view(len(lam), self.n, self.width)


class ImagenUNet(nn.Module):
    """imagen-pytorch's Unet (1.26) as the authors configured it [Imagen]; `paper` trains these.
    Imagen is a text-to-image model: its cross-attention layers read text tokens. The authors give
    no text, so those layers read only the two noise-level tokens (and the augmentation level's):
    a costlier way of conditioning on the noise level, kept because it is theirs.
    Per level, encoder: (efficient: pixel_down first) a first ResBlock (cross-attention to the
    tokens where cross_attn says), `blocks` ResBlocks with a global-context gate (global
    information at conv cost), an attention layer (TransformerBlock) where attn says, (plain:
    pixel_down after, a ConvPair at the last level); a skip after each of the ResBlocks but the
    first and after the attention. Middle: ResBlock, attention, ResBlock (both with
    cross-attention). Decoder: the mirror, eating the skips (scaled by 1/sqrt 2, so a
    concatenation does not double the variance), up by shuffle_up. Out: (init_residual: the input
    conv's output concatenated: full-resolution detail skips the network) a gated ResBlock,
    (super-resolution: the low-res image concatenated) a 3x3 conv. Super-resolution models
    (aug_emb: cond[:, :3] is the low-res image, as cascade.level_inputs puts it) double the
    embedding and add the augmentation level's tokens. GroupNorm of cfg.groups (imagen: 8)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        w, blocks = cfg.width, cfg.per_level_blocks()
        self.lowres = cfg.aug_emb
        self.emb_dim = 4 * w * (2 if self.lowres else 1)            # imagen's time_cond_dim
        self.emb = NoiseLevel(w, self.emb_dim)
        self.aug_emb = NoiseLevel(w, self.emb_dim) if self.lowres else None
        self.norm_tokens = nn.LayerNorm(w)
        self.conv_in = CrossEmbed(cfg.img_ch + cfg.cond_ch, w)
        self.in_block = self.res(w, w, gca=True) if cfg.efficient else None
        dims, skip_ch = [w] + [w * m for m in cfg.mults], []
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        for lvl, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
            ch, last = (dout if cfg.efficient else din), lvl == len(blocks) - 1
            post = nn.Identity() if cfg.efficient else (ConvPair if last else pixel_down)(ch, dout)
            self.down.append(nn.ModuleDict(dict(
                pre=pixel_down(din, dout) if cfg.efficient else nn.Identity(),
                first=self.res(ch, ch, cross=cfg.cross_attn[lvl]),
                blocks=nn.ModuleList(self.res(ch, ch, gca=True) for _ in range(blocks[lvl])),
                attn=self.transformer(ch, lvl), post=post)))
            skip_ch.append(ch)
        mid = dims[-1]
        # (imagen's middle ResnetBlocks keep CrossAttention's 8 heads of 64 whatever attn_heads)
        self.mid = nn.ModuleList([self.res(mid, mid, cross=True, heads=(8, 64)),
                                  TransformerBlock(mid, cfg.heads, cfg.head_dim),
                                  self.res(mid, mid, cross=True, heads=(8, 64))])
        for lvl in reversed(range(len(blocks))):
            din, dout, s = dims[lvl], dims[lvl + 1], skip_ch.pop()
            up = shuffle_up(dout, din) if lvl or cfg.efficient else nn.Identity()
            self.up.append(nn.ModuleDict(dict(
                first=self.res(dout + s, dout, cross=cfg.cross_attn[lvl]),
                blocks=nn.ModuleList(self.res(dout + s, dout, gca=True)
                                     for _ in range(blocks[lvl])),
                attn=self.transformer(dout, lvl), post=up)))
        self.out_block = self.res(w * (2 if cfg.init_residual else 1), w, gca=True)
        self.out = nn.Conv2d(w + (3 if self.lowres else 0), cfg.img_ch, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # zero output at init [ADM; imagen's zero_init_]
        nn.init.zeros_(self.out.bias)

    def res(self, cin, cout, cross=False, gca=False, heads=None):
        cfg = self.cfg  # heads: the cross-attention's (heads, head_dim); default the config's
        block = ResBlock(cin, cout, self.emb_dim, cfg.dropout, cfg.groups,
                         (*(heads or (cfg.heads, cfg.head_dim)), cfg.width) if cross else None,
                         gca)
        block.conv2.reset_parameters()  # imagen keeps the default init (ADM zeroes it)
        return block

    def transformer(self, ch, lvl):
        cfg = self.cfg
        return (TransformerBlock(ch, cfg.heads, cfg.head_dim, cfg.width) if cfg.attn[lvl]
                else nn.Identity())

    def forward(self, x, lam, cond=None, aug_lam=None):
        """As UNet.forward; sizes divisible by 2^levels (efficient) or 2^(levels - 1)."""
        cfg = self.cfg
        f = 2 ** (len(cfg.mults) - (0 if cfg.efficient else 1))
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"U-Net input {tuple(x.shape[-2:])} is not divisible by {f}")
        emb, tokens = self.emb(lam)                                  # (B, E), (B, 2, w)
        if self.aug_emb is not None:
            aug_lam = torch.full_like(lam, sde.LAM_CLAMP) if aug_lam is None else aug_lam
            aug, aug_tokens = self.aug_emb(aug_lam)
            emb, tokens = emb + aug, torch.cat([tokens, aug_tokens], dim=1)
        emb, tokens = emb.to(x.dtype), self.norm_tokens(tokens).to(x.dtype)
        attend = lambda layer, h: h if isinstance(layer, nn.Identity) else layer(h, tokens)
        cond = cond.to(x.dtype) if cfg.cond_ch else None
        h = first = self.conv_in(torch.cat([x, cond], dim=1) if cfg.cond_ch else x)
        if self.in_block is not None:  # efficient: the one full-resolution ResBlock in
            h = self.in_block(h, emb)
        skips = []
        for level in self.down:
            h = level["first"](level["pre"](h), emb, tokens)
            for block in level["blocks"]:
                h = block(h, emb)
                skips.append(h)
            h = attend(level["attn"], h)
            skips.append(h)
            h = level["post"](h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb, tokens)), emb, tokens)
        skip = lambda h: torch.cat([h, skips.pop() * 2 ** -0.5], dim=1)
        for level in self.up:
            h = level["first"](skip(h), emb, tokens)
            for block in level["blocks"]:
                h = block(skip(h), emb)
            h = level["post"](attend(level["attn"], h))
        h = self.out_block(torch.cat([h, first], dim=1) if cfg.init_residual else h, emb)
        return self.out(torch.cat([h, cond[:, :3]], dim=1) if self.lowres else h)
