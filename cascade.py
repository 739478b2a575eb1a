"""Presets, stage/level geometry, and how one CDM chains its three U-Nets.

URCDM = 3 stages x 3 levels. Stage s produces an N_s x N_s image (stage 1: the whole
slide zoomed out; stages 2 and 3: an overlapping grid of P x P patches). Within a stage a
cascaded diffusion model (CDM) generates each patch at 64 -> 256 -> 1024 px (paper sizes);
level l > 0 is conditioned on level l-1's output, and a stage s > 1 patch on two crops of
the stage s-1 image: the *context* (P x P around the patch, at stage s-1 resolution) and
the *region* (exactly the stage s-1 pixels under the patch, upsampled to P x P).

This file is the one place where the geometry lives; data.py (training) and tiler.py
(sampling) both call it, so training sees exactly what sampling feeds.

Images are float tensors in [-1, 1], (B, 3, H, W), unless a name says uint8.

References
  [PAPER]   Cechnicka et al., URCDM, MICCAI 2024 (Sec. 2, Fig. 1; Eq. 3 for the CDM).
  [CDM]     Ho et al., Cascaded diffusion models, 2021.
  [Imagen]  Saharia et al., 2022 (conditioning augmentation, sizes, step counts).
  [Feather] Szeliski, Image alignment and stitching: a tutorial, 2006 (feathered blending).
"""
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import sde
import unet as unet_mod


# ----------------------------------------------------------------------------- presets

@dataclass(frozen=True)
class Preset:
    name: str
    patch: int                 # P: patch side at every stage, also the top level's size
    n_patches: tuple           # patches per side per stage; stage 1 is (1,)
    level_sizes: tuple         # the CDM's three image sizes; level_sizes[-1] == patch
    unets: tuple               # named U-Net config (unet.CONFIGS) per level
    steps: tuple               # default sampling steps per level
    schedules: tuple           # noise schedule per level
    sampler: str = "ancestral"
    aug_sample: float = 0.2    # conditioning augmentation level t_aug at sampling [Imagen]
    aug_train_max: float = 0.5 # training draws t_aug ~ U(0, aug_train_max)
    train_crop: int = 256      # the top level trains on random crops of this size
    background: int = 255      # grey level padded outside an image (white glass)

    @property
    def overlap(self):  # o = P / 8: 12.5 % overlap [PAPER]
        return self.patch // 8

    @property
    def stride(self):  # S = P - o
        return self.patch - self.overlap

    @property
    def edge_margin(self):  # m = o / 8: inner-edge px later patches redraw (tiler.trusted_span)
        return self.overlap // 8

    @property
    def feather(self):  # px over which known pixels fade into a new patch (feather_weight)
        return self.overlap // 8

    def to_dict(self):
        return asdict(self)

    def model_dict(self):
        """The fields a trained model depends on (not the sampling defaults: steps, sampler,
        aug_sample; nor train_crop, a training choice), compared when a checkpoint is loaded."""
        return {k: v for k, v in asdict(self).items() if k not in ("steps", "sampler", "aug_sample", "train_crop")}


PRESETS = {
    # DESIGN §2: P = 1024, stages 1024 / 6400 / 41344, 64 -> 256 -> 1024 px per CDM.
    "paper": Preset("paper", patch=1024, n_patches=(1, 7, 46), level_sizes=(64, 256, 1024),
                    unets=("paper64", "paper256", "paper1024"), steps=(1024, 256, 256),
                    schedules=("cosine", "cosine", "linear")),
    # Same structure at CPU size: stages 256 / 704 / 2048, 16 -> 64 -> 256 px per CDM.
    "demo": Preset("demo", patch=256, n_patches=(1, 3, 9), level_sizes=(16, 64, 256),
                   unets=("demo_base", "demo", "demo"), steps=(50, 25, 10),
                   schedules=("cosine", "cosine", "linear"), train_crop=64),
    # For tests and smoke runs: stages 32 / 88 / 116, 8 -> 16 -> 32 px, a few steps.
    "tiny": Preset("tiny", patch=32, n_patches=(1, 3, 4), level_sizes=(8, 16, 32), unets=("tiny",) * 3,
                   steps=(3, 3, 3), schedules=("cosine", "cosine", "linear"), train_crop=16),
}


def get_preset(name):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# ----------------------------------------------------------------------------- geometry

def stage_size(preset, stage):
    """N_s = P + (n_s - 1) S: the side of the stage-s image."""
    return preset.patch + (preset.n_patches[stage - 1] - 1) * preset.stride


def zoom(preset, stage):
    """r_s = N_s / N_(s-1), the magnification from stage s-1 to stage s (s >= 2)."""
    return stage_size(preset, stage) / stage_size(preset, stage - 1)


def context_origin(y0, x0, P, r):
    """Top-left (integer, in stage s-1 pixels) of the P x P context crop centred on the
    centre of the stage-s patch at (y0, x0): ((y0 + P/2)/r, (x0 + P/2)/r) [PAPER Sec. 2]."""
    return round((y0 + P / 2) / r - P / 2), round((x0 + P / 2) / r - P / 2)


def window(img, y0, x0, h, w, background):
    """img[y0:y0+h, x0:x0+w] of an (H, W, 3) uint8 array (or memmap), padded with
    `background` where the window leaves the image. Only the window is read."""
    H, W = img.shape[:2]
    out = np.full((h, w, img.shape[2]), background, dtype=np.uint8)
    ya, yb, xa, xb = max(y0, 0), min(y0 + h, H), max(x0, 0), min(x0 + w, W)
    if ya < yb and xa < xb:
        out[ya - y0:yb - y0, xa - x0:xb - x0] = img[ya:yb, xa:xb]
    return out


def context_crop(lower, y0, x0, P, r, background):
    """The P x P context of a stage-s patch at (y0, x0): stage s-1 pixels, uint8 (P, P, 3)."""
    cy, cx = context_origin(y0, x0, P, r)
    return window(lower, cy, cx, P, P, background)


def region_window(lower, y0, x0, P, r):
    """The stage s-1 pixels under the patch, [floor(y0/r), ceil((y0+P)/r)), uint8, not resampled:
    what the white-patch test looks at (about 164 px at paper size, instead of P x P)."""
    H, W = lower.shape[:2]
    ya, xa = max(math.floor(y0 / r), 0), max(math.floor(x0 / r), 0)
    return np.asarray(lower[ya:min(math.ceil((y0 + P) / r), H), xa:min(math.ceil((x0 + P) / r), W)])


def region_crop(lower, y0, x0, P, r):
    """The stage s-1 pixels under the patch, [y0/r, (y0+P)/r), upsampled to P x P.

    Bilinear, at the exact sub-pixel position (Y + 0.5)/r - 0.5 of each stage-s pixel Y
    (clamped to the image), computed separably from global coordinates only, so that
    overlapping patches get bit-identical values where they overlap. It is also the fill
    of white patches (the "upscaled medium-magnification image" [PAPER]).
    Returns float (1, 3, P, P) in [-1, 1]."""
    H, W = lower.shape[:2]

    def taps(q0, size):  # (lo, hi, weight of hi) per output pixel, source indices in [0, size)
        s = ((torch.arange(P, dtype=torch.float64) + 0.5 + q0) / r - 0.5).clamp(0, size - 1)
        lo = s.floor().long()
        return lo, (lo + 1).clamp(max=size - 1), (s - lo).float()

    ylo, yhi, wy = taps(y0, H)
    xlo, xhi, wx = taps(x0, W)
    ya, xa = int(ylo[0]), int(xlo[0])
    crop = torch.from_numpy(np.array(lower[ya:int(yhi[-1]) + 1, xa:int(xhi[-1]) + 1], dtype=np.float32))
    rows = crop[ylo - ya] * (1 - wy)[:, None, None] + crop[yhi - ya] * wy[:, None, None]  # (P, w, 3)
    out = rows[:, xlo - xa] * (1 - wx)[None, :, None] + rows[:, xhi - xa] * wx[None, :, None]  # (P, P, 3)
    return (out / 127.5 - 1).permute(2, 0, 1)[None]


def to_float(u8):
    """(H, W, 3) or (B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    t = torch.from_numpy(np.array(u8, dtype=np.uint8))  # a copy: memmaps are read-only
    t = t[None] if t.dim() == 3 else t
    return t.permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x):
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8 (round to nearest)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def downsample(x, size):
    """Area (box-filter) resize to size x size: targets, known pixels and crops of each level."""
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="area")


def feather_weight(mask, width):
    """(B, 1, L, L) bool known mask -> float weight of the known pixels in a patch's output:
    min(1, d / (width + 1)), d = Chebyshev distance (px) from a known pixel to the nearest
    pixel that is not known (1 next to it), 0 where not known; width 0 gives the mask itself.
    Pixels outside the patch count as known, so only the new region's edge is feathered.
    deviation: the paper pastes the known pixels exactly; a hard paste leaves a visible step
    where few-step inpainting did not quite meet them, so the last `width` known px fade into
    the model's own x0_hat of them (feathered compositing [Feather])."""
    w = mask.float()
    if width <= 0:
        return w
    unknown, d = 1 - w, torch.zeros_like(w)
    for _ in range(width + 1):  # grow the unknown region 1 px per pass; d = passes a px stays known
        d += 1 - unknown
        unknown = F.max_pool2d(unknown, 3, stride=1, padding=1)  # -inf padding: outside is known
    return d / (width + 1)


def make_lowres(x_prev, size):
    """Level l-1's image (B, 3, L_(l-1), L_(l-1)) -> level l's conditioning input at
    size x size (bilinear upsampling) [CDM]. Training feeds it downsample(target, L_(l-1))."""
    return F.interpolate(x_prev, size=(size, size), mode="bilinear", align_corners=False)


def level_inputs(preset, stage, level, target_or_lowres, context=None, region=None, conditioned=True):
    """Conditioning channels of (stage, level), in the order the U-Net concatenates them:
    [lowres (level > 0)], [context, region (stage > 1, conditioned)], all at level size.
    `target_or_lowres` is level l-1's image (any size; made into the lowres input here).
    Returns (B, C, L, L) or None when there is no conditioning."""
    L = preset.level_sizes[level]
    parts = []
    if level > 0:
        parts.append(make_lowres(downsample(target_or_lowres, preset.level_sizes[level - 1]), L))
    if stage > 1 and conditioned:
        parts += [downsample(context, L), downsample(region, L)]
    return torch.cat(parts, dim=1) if parts else None


def cond_channels(stage, level, conditioned=True):
    return 3 * (level > 0) + 6 * (stage > 1 and conditioned)


def unet_config(preset, stage, level, conditioned=True):
    """The U-Net config of (stage, level): the preset's named size with its input channels."""
    ch = cond_channels(stage, level, conditioned)
    return unet_mod.get_config(preset.unets[level], cond_ch=ch, aug_emb=ch > 0)


# ----------------------------------------------------------------------------- the CDM

class CDM:
    """One stage's cascade of three U-Nets [PAPER Eq. 3]: C_0 from noise, C_l conditioned
    on I_(l-1) (and, for stages 2-3, on context and region)."""

    def __init__(self, preset, stage, nets, conditioned=True, device="cpu", bf16=False):
        # nets: three callables net(x_t, lam, cond, aug_lam) -> v_hat (U-Nets, or closed forms in tests)
        # bf16: run the networks under bfloat16 autocast (the sampler's state stays float32)
        self.preset, self.stage, self.nets, self.conditioned = preset, stage, list(nets), conditioned
        self.device, self.bf16 = torch.device(device), bf16

    def model_fn(self, level, cond, aug_t):
        """model_fn(x_t, t) -> v_hat for sde.sample, with the conditioning bound."""
        net, schedule = self.nets[level], self.preset.schedules[level]
        aug_lam = None if cond is None else sde.log_snr(aug_t, "cosine").float()

        aug_lam = None if aug_lam is None else aug_lam.to(self.device)

        def fn(x_t, t):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                return net(x_t, sde.log_snr(t.cpu(), schedule).float().to(self.device), cond, aug_lam).float()
        return fn

    @torch.no_grad()
    def sample(self, generators, *, known=None, mask=None, context=None, region=None,
               steps=None, sampler=None, resample=1, feather=0):
        """Generate one patch per generator.

        generators: list of torch.Generator, one per patch (its only randomness).
        known, mask: (B, 3, P, P) float and (B, 1, P, P) bool, True where pixels are already
          fixed by finished neighbours; None for no inpainting. Held at every level,
          downsampled to its size (a level pixel is known when its whole block is).
        context, region: (B, 3, P, P) float crops of the stage below (stages 2-3).
        steps, sampler: per-level step counts and sampler; None = the preset's.
        feather: px (at P) over which the known pixels fade into the new ones (feather_weight),
          scaled to each level's size; 0 = known pixels are exact.
        Returns (B, 3, P, P) float in [-1, 1]; known pixels are exact except the last
        `feather` px next to the new ones."""
        p, B, dev = self.preset, len(generators), self.device
        steps = steps or p.steps
        to = lambda t: None if t is None else t.to(dev)
        known, mask, context, region = to(known), to(mask), to(context), to(region)
        x = None
        for level, L in enumerate(p.level_sizes):
            cond = level_inputs(p, self.stage, level, x, context, region, self.conditioned)
            aug_t = p.aug_sample
            if cond is not None:  # conditioning augmentation at a fixed level [Imagen]
                cond, aug_t = sde.augment_cond(cond, aug_t, generators)
            k = m = w = None
            if known is not None:
                k = downsample(known, L)
                m = downsample(mask.float(), L) > 0.999
                w = feather_weight(m, feather * L // p.patch)
            x = sde.sample(self.model_fn(level, cond, aug_t), (B, 3, L, L), steps=steps[level],
                           sampler=sampler or p.sampler, schedule=p.schedules[level], known=k, mask=m, blend=w,
                           generator=generators, resample=resample, device=dev)
            x = x.clamp(-1, 1)
        return x.cpu()


# ----------------------------------------------------------------------------- checkpoints

MODEL_FORMAT = "urcdm-model-v1"


def model_filename(stage, level):
    return f"stage{stage}_level{level}.pt"


def model_payload(preset, stage, level, cfg, state_dict, conditioned=True, **extra):
    """The dictionary saved as stage{s}_level{l}.pt (plain types only: weights_only=True loads it)."""
    return {"format": MODEL_FORMAT, "preset": preset.to_dict(), "stage": stage, "level": level,
            "conditioned": conditioned, "unet_config": cfg.to_dict(), "ema": state_dict, **extra}


def load_unet(path, preset, stage, level, device="cpu"):
    """Build the U-Net of (stage, level) from its file alone; a clear error if the file is
    missing, unreadable, or belongs to another stage, level or preset."""
    fix = f"train it with `python train.py --preset {preset.name} --stage {stage} --level {level}` or point --ckpt elsewhere"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing model file; {fix}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise ValueError(f"{path}: not a readable URCDM model file ({type(e).__name__}); {fix}") from None
    if not isinstance(ck, dict) or ck.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not a URCDM model file (format {MODEL_FORMAT} expected); {fix}")
    if (ck["stage"], ck["level"]) != (stage, level):
        raise ValueError(f"{path}: holds stage {ck['stage']} level {ck['level']}, expected stage {stage} "
                         f"level {level}; rename or retrain it")
    saved = {k: v for k, v in ck["preset"].items() if k in preset.model_dict()}
    if saved != preset.model_dict():
        raise ValueError(f"{path}: trained for preset {ck['preset'].get('name')!r} with other settings than "
                         f"preset {preset.name!r}; pass the matching --preset or retrain")
    net = unet_mod.UNet(unet_mod.UNetConfig(**ck["unet_config"]))
    net.load_state_dict(ck["ema"])
    # channels_last: about 4x faster convolutions on CPU (tests/bench_unet.py), same on GPU
    return net.to(device, memory_format=torch.channels_last).eval(), ck.get("conditioned", True)


def load_cdm(ckpt_dir, preset, stage, device="cpu", bf16=False):
    """The CDM of one stage from CKPT_DIR/stage{s}_level{0,1,2}.pt."""
    loaded = [load_unet(os.path.join(ckpt_dir, model_filename(stage, lvl)), preset, stage, lvl, device)
              for lvl in range(3)]
    flags = {c for _, c in loaded}
    if len(flags) != 1:
        raise ValueError(f"{ckpt_dir}: stage {stage} mixes conditioned and outpainting models")
    return CDM(preset, stage, [n for n, _ in loaded], conditioned=flags.pop(), device=device, bf16=bf16)


# ----------------------------------------------------------------------------- processes

def init_distributed(device_arg=None):
    """torchrun or plain python [nanoGPT]: returns (ddp, rank, world, device). Under torchrun the
    process group uses nccl on GPU and gloo on CPU; device_arg: 'cuda', 'cpu' or None (auto)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world, local = 0, 1, 0
    cuda = torch.cuda.is_available() and device_arg != "cpu"
    if ddp:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if cuda else (device_arg or "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return ddp, rank, world, device
