"""Presets, stage/level geometry, and how one CDM chains its three U-Nets.

URCDM = 3 stages x 3 levels. Stage s produces an N_s x N_s image (stage 1: the whole
slide zoomed out; stages 2 and 3: an overlapping grid of P x P patches). Within a stage a
cascaded diffusion model (CDM) generates each patch at 64 -> 256 -> 1024 px (paper sizes);
level l > 0 is conditioned on level l-1's output, and a stage s > 1 patch on two crops of
the stage s-1 image: the *context* (P x P around the patch, at stage s-1 resolution) and,
in our presets, the *region* (exactly the stage s-1 pixels under the patch, upsampled to P x P).

This file is the one place where the geometry lives; data.py (training) and tiler.py
(sampling) both call it, so training sees exactly what sampling feeds.

Images are float tensors in [-1, 1], (B, 3, H, W), unless a name says uint8.

References
  [PAPER]   Cechnicka et al., URCDM, MICCAI 2024 (Sec. 2, Fig. 1; Eq. 3 for the CDM).
  [CDM]     Ho et al., Cascaded diffusion models, 2021.
  [Imagen]  Saharia et al., 2022 (conditioning augmentation, sizes, step counts); the authors
            trained with lucidrains' imagen-pytorch 1.25, whose defaults the `paper` preset copies.
  [MinSNR]  Hang et al., Efficient diffusion training via min-SNR weighting, 2023.
  [Feather] Szeliski, Image alignment and stitching: a tutorial, 2006 (feathered blending).
"""
import contextlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

import sde
import unet as unet_mod


# ---------------------------------------------------------------------- presets

@dataclass(frozen=True)
class Sampling:
    """How a preset samples by default; sample.py's flags override each field. Never part of a
    model's identity: a trained model can be sampled with any of these (distilled models record
    the steps and sampler they were distilled for, which sampling then takes: settings.py)."""
    steps: tuple                      # denoising steps per level (3 values), or per stage and
                                      #   level (9: stage 1's 3 levels, stage 2's, stage 3's)
    sampler: object = "ancestral"     # sde.SAMPLERS: one for all, or 3 / 9 as `steps`;
                                      #   'ancestral' is the paper's loop (sde.sample), the
                                      #   others and resample > 1 run sde.sample_general
    eta: float = 0.0                  # DDIM's noise scale (0 = deterministic; others ignore it)
    aug_level: float = 0.2            # t_aug of the conditioning augmentation [Imagen: 0.2]
    threshold: object = None          # dynamic thresholding quantile p of x0_hat [Imagen: 0.95]
    edge_margin: int = 0              # px of a patch's inner edges the next patch redraws
    feather: int = 0                  # px over which known pixels fade into a new one (feather)
    fill_white: tuple = (3,)          # stages whose mostly-white patches are filled from below
    resample: int = 1                 # RePaint jumps per step (1 = off)
    order: str = "packed"             # tiler.ORDERS: packed = raster's slide, in full rounds
    ends: str = "clamped"             # sde.ENDS: the schedule at t = 1 and t = 0 ('imagen':
                                      #   the authors' library; 'clamped': ours, sde.log_snr)

    def __post_init__(self):
        if len(self.steps) not in (3, 9) or min(self.steps) < 1:
            raise ValueError(f"steps {self.steps}: give 3 values (one per level) or 9 (per stage "
                             "and level), each >= 1")
        if not isinstance(self.sampler, str) and len(self.sampler) not in (3, 9):
            raise ValueError(f"sampler {self.sampler}: give 1, 3 or 9 names")

    def level_steps(self, stage, level):
        """Denoising steps of (stage, level)."""
        return self.steps[level] if len(self.steps) == 3 else self.steps[3 * (stage - 1) + level]

    def level_sampler(self, stage, level):
        """The step rule of (stage, level)."""
        if isinstance(self.sampler, str):
            return self.sampler
        return self.sampler[level] if len(self.sampler) == 3 else \
            self.sampler[3 * (stage - 1) + level]


@dataclass(frozen=True)
class Training:
    """How a preset's models are trained by default (train.py). Recorded in every checkpoint;
    not part of a model's identity (a training phase may change them, e.g. --crop)."""
    crop: int = 256                   # the top level trains on random crops of this side [Imagen]
    aug_train: tuple = (0.0, 1.0)     # t_aug ~ U(lo, hi) in training [Imagen: U(0, 1)]
    aug_per_batch: bool = True        # one t_aug per batch [imagen-pytorch] or one per sample
    min_snr_gamma: object = 5.0       # min-SNR loss weight [MinSNR; imagen-pytorch]; None = off
    area_choice: str = "centre"       # each slide's area: 'centre' [PAPER] or on the 'tissue'
    positions: str = "grid"           # where stage 2-3 examples are: the authors' tissue 'grid'
                                      #   over the whole slide [their patient_dataset.py] or
                                      #   anywhere in the 'area' [PAPER] (data.py)
    crop_context: str = "whole"       # the top level's crops see the 'whole' context resized
                                      #   onto the crop [imagen-pytorch] or its 'window'
    ema_warmup: str = "ema-pytorch"   # the EMA's schedule (train.ema_decay): 'ema-pytorch' [the
                                      #   authors' trainer] or 'fast' (every step, (1+n)/(10+n))
    fields: tuple = None              # level-0 px of a stage-1, 2, 3 field (data.training_fields);
                                      #   None: sampling's geometry, (N3, P N3 / N2, P)
    holdout: float = 0.025            # share of the examples held out for a validation loss


@dataclass(frozen=True)
class Preset:
    """Everything a model depends on (its identity, compared when a checkpoint is loaded),
    plus its training and sampling defaults."""
    name: str
    patch: int                        # P: patch side at every stage, also the top level's size
    n_patches: tuple                  # patches per side per stage; stage 1 is (1,)
    level_sizes: tuple                # the CDM's three image sizes; level_sizes[-1] == patch
    unets: tuple                      # named U-Net config (unet.CONFIGS) per level
    schedules: tuple                  # noise schedule of x_t per level (sde.SCHEDULES)
    objectives: tuple = ("v", "v", "v")  # what each level's U-Net predicts: 'v' or 'eps'
    aug_schedule: str = "linear"      # log-SNR schedule of the conditioning augmentation [Imagen]
    aug_inputs: str = "lowres"        # noised: 'lowres' (level l-1's image) or 'all' inputs
    region: bool = False              # stages 2-3 also see the region crop (the pixels zoomed into)
    background: object = 255          # grey level or (R, G, B) padded outside an image (glass)
    context_range: tuple = (-1.0, 1.0)  # the context's values for the U-Net: the image's [-1, 1]
                                      #   or imagen's [0, 1] (`paper`: in_context_range)
    resize: str = "area"              # RESIZES: 'area' (box down, bilinear up) or 'nearest'
    training: Training = Training()
    sampling: Sampling = None

    def model_dict(self):
        """The fields a trained model depends on: all but the name and the two sets of defaults."""
        return {k: v for k, v in asdict(self).items() if k not in ("name", "training", "sampling")}


# deviation (demo, tiny): the small presets' models predict v at every level, noise every
# conditioning input with the cosine schedule and see the region crop (docs/departures.md).
_SMALL_MODELS = dict(objectives=("v", "v", "v"), aug_schedule="cosine", aug_inputs="all",
                     region=True, resize="area", context_range=(-1.0, 1.0))


_PAPER_GEOMETRY = dict(patch=1024, n_patches=(1, 7, 46), level_sizes=(64, 256, 1024),
                       unets=("paper64", "paper256", "paper1024"),
                       schedules=("cosine", "cosine", "linear"),
                       background=(242, 243, 242))  # the authors' dataset pads with this grey


def _small_training(crop):
    """The demo's and tiny's training recipe (short CPU runs), top-level crops of `crop` px."""
    return Training(crop=crop, aug_train=(0.0, 0.5), aug_per_batch=False, min_snr_gamma=None,
                    area_choice="tissue", ema_warmup="fast", positions="area",
                    crop_context="window")


PRESETS = {
    # The authors' recipe: geometry and sizes [PAPER Sec. 2-3]; everything else the imagen-pytorch
    # 1.25 defaults their training script leaves on (docs/design.md, "The paper preset").
    "paper": Preset("paper", **_PAPER_GEOMETRY, resize="nearest",  # imagen-pytorch's resize
                    training=Training(fields=(40000, 6500, 1024)),  # their patient_dataset.py
                    objectives=("eps", "v", "v"),  # their pred_objectives: eps for the base unet
                    context_range=(0.0, 1.0),  # their cond_images: the dataset's [0, 1] tensors
                    sampling=Sampling(steps=(1024, 256, 256), threshold=0.95, ends="imagen")),
    # deviation: the paper's geometry and sizes with our choices, each with its measured effect in
    # docs/departures.md: leaner U-Nets (0.93 x the authors' slide FLOPs), stage 2-3 examples
    # anywhere in the area (as the paper says), top-level crops that see their context's window,
    # region conditioning, the inner-edge margin and the feathered paste (overlap / 8 = 16 px),
    # white fill at stage 2 too, the checkerboard order, and DPM-Solver++(2M) at about 1/4-1/5 of
    # the authors' steps: 1.36e18 FLOP a slide without glass against their 7.53e18.
    "paper_plus": Preset("paper_plus", **{**_PAPER_GEOMETRY, "unets": ("plus64", "plus256",
                                                                       "plus1024")},
                         objectives=("eps", "v", "v"), region=True,
                         training=Training(positions="area", crop_context="window"),
                         sampling=Sampling(steps=(256, 64, 48), sampler="dpmpp2m", threshold=0.95,
                                           edge_margin=16, feather=16, fill_white=(2, 3),
                                           order="checkerboard")),
    # The shipped CPU demo (stages 256 / 704 / 2048, 16 -> 64 -> 256 px).
    # deviation: the settings its models were trained with (docs/departures.md): v everywhere,
    # cosine augmentation of every input over U(0, 0.5) per sample, region conditioning, no
    # min-SNR, tissue-centred areas and examples inside them, the context's window on top-level
    # crops, no thresholding, the inner-edge margin and feather (4 px), white fill at stages 2-3,
    # UNet's ADM layout, an EMA updated every step with a fast warm-up (short CPU runs).
    "demo": Preset("demo", patch=256, n_patches=(1, 3, 9), level_sizes=(16, 64, 256),
                   unets=("demo_base", "demo", "demo"), schedules=("cosine", "cosine", "linear"),
                   **_SMALL_MODELS, training=_small_training(crop=64),
                   sampling=Sampling(steps=(50, 25, 10), edge_margin=4, feather=4,
                                     fill_white=(2, 3))),
    # For tests and smoke runs: stages 32 / 88 / 116, 8 -> 16 -> 32 px, a few steps.
    "tiny": Preset("tiny", patch=32, n_patches=(1, 3, 4), level_sizes=(8, 16, 32),
                   unets=("tiny",) * 3, schedules=("cosine", "cosine", "linear"),
                   **_SMALL_MODELS, training=_small_training(crop=16),
                   sampling=Sampling(steps=(3, 3, 3), fill_white=(2, 3))),
}


def get_preset(name):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# ---------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class Grid:
    """The overlapping n x n patch grid of a stage: patch P, overlap o = P / 8 (12.5 % [PAPER]),
    stride S = P - o, side N = P + (n - 1) S. margin: px at a patch's inner edges that later
    neighbours regenerate (tiler.trusted_span)."""
    patch: int
    n: int
    margin: int = 0

    def __post_init__(self):  # the next patch must redraw the margin from its interior
        if not 0 <= self.margin <= self.overlap // 2:
            raise ValueError(f"margin {self.margin}: use 0 to {self.overlap // 2} "
                             "(half the overlap)")

    @property
    def overlap(self):
        return self.patch // 8

    @property
    def stride(self):
        return self.patch - self.overlap

    @property
    def size(self):
        return self.patch + (self.n - 1) * self.stride

    def origin(self, i, j):
        """Top-left (y0, x0) of patch (i, j) in stage pixels."""
        return i * self.stride, j * self.stride


def stage_grid(preset, stage, margin=0):
    """The patch grid of a stage (stage 1 is one patch: the whole slide zoomed out)."""
    return Grid(preset.patch, preset.n_patches[stage - 1], margin)


def stage_size(preset, stage):
    """N_s = P + (n_s - 1) S: the side of the stage-s image."""
    return stage_grid(preset, stage).size


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


def field_under(y0, x0, h, w, r, size=None):
    """The rows [ya, yb) and columns [xa, xb) of the stage below under the h x w px at (y0, x0) of
    a stage zoomed r times from it: [floor(y0 / r), ceil((y0 + h) / r)), at least one px, clipped
    to a size x size image when `size` is given. What the white-patch test looks at (about 164 px
    under a patch at paper size), and what a window's lower stages show."""
    ya, xa = math.floor(y0 / r), math.floor(x0 / r)
    yb, xb = max(math.ceil((y0 + h) / r), ya + 1), max(math.ceil((x0 + w) / r), xa + 1)
    if size is not None:
        ya, yb, xa, xb = (min(max(v, 0), size) for v in (ya, yb, xa, xb))
    return ya, yb, xa, xb


def region_crop(lower, y0, x0, P, r):
    """The stage s-1 pixels under the patch, [y0/r, (y0+P)/r), upsampled to P x P.

    Bilinear, at the exact sub-pixel position (Y + 0.5)/r - 0.5 of each stage-s pixel Y
    (clamped to the image), computed separably from global coordinates only, so that
    overlapping patches get bit-identical values where they overlap. It is also the fill
    of white patches (the "upscaled medium-magnification image" [PAPER]).
    Returns float (1, 3, P, P) in [-1, 1]."""
    H, W = lower.shape[:2]
    ylo, yhi, wy = _taps(y0, H, P, r)
    xlo, xhi, wx = _taps(x0, W, P, r)
    ya, xa = int(ylo[0]), int(xlo[0])
    crop = torch.from_numpy(np.array(lower[ya:int(yhi[-1]) + 1,
                                           xa:int(xhi[-1]) + 1], dtype=np.float32))
    rows = crop[ylo - ya] * (1 - wy)[:, None, None] + crop[yhi - ya] * wy[:, None, None]  # (P,w,3)
    out = rows[:, xlo - xa] * (1 - wx)[None, :, None] + rows[:, xhi - xa] * wx[None, :, None]
    return (out / 127.5 - 1).permute(2, 0, 1)[None]


def _taps(q0, size, P, r):
    """region_crop's (lo, hi, weight of hi) per output pixel; source indices in [0, size)."""
    s = ((torch.arange(P, dtype=torch.float64) + 0.5 + q0) / r - 0.5).clamp(0, size - 1)
    lo = s.floor().long()
    return lo, (lo + 1).clamp(max=size - 1), (s - lo).float()


def region_span(shape, y0, x0, P, r):
    """The rows [ya, yb) and columns [xa, xb) of the stage below that region_crop reads."""
    (ylo, yhi, _), (xlo, xhi, _) = _taps(y0, shape[0], P, r), _taps(x0, shape[1], P, r)
    return int(ylo[0]), int(yhi[-1]) + 1, int(xlo[0]), int(xhi[-1]) + 1


def to_float(u8):
    """(H, W, 3) or (B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    t = torch.from_numpy(np.array(u8, dtype=np.uint8))  # a copy: memmaps are read-only
    t = t[None] if t.dim() == 3 else t
    return t.permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x):
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8 (round to nearest)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


RESIZES = ("area", "nearest")


def downsample(x, size, mode="area"):
    """Resize to size x size: targets, known pixels and crops of each level. 'area' (the box
    filter) or 'nearest' (pixel floor(i * factor) [imagen-pytorch's resize_image_to]).
    deviation ('area': paper_plus, demo): imagen-pytorch resizes with 'nearest' everywhere
    (targets, the lowres input down and up, the context); we prefer area down, bilinear up."""
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode=mode)


def feather_weight(mask, width):
    """(B, 1, L, L) bool known mask -> float weight of the known pixels in a patch's output:
    min(1, d / (width + 1)), d = Chebyshev distance (px) from a known pixel to the nearest
    pixel that is not known (1 next to it), 0 where not known; width 0 gives the mask itself.
    Pixels outside the patch count as known, so only the new pixels' edge is feathered.
    deviation: the paper pastes the known pixels exactly; a hard paste leaves a visible step
    where few-step inpainting did not quite meet them, so the last `width` known px fade into
    the model's own x0_hat of them (feathered compositing [Feather])."""
    w = mask.float()
    if width <= 0:
        return w
    unknown, d = 1 - w, torch.zeros_like(w)
    for _ in range(width + 1):  # grow the unknown part 1 px per pass; d = passes a px stays known
        d += 1 - unknown
        unknown = F.max_pool2d(unknown, 3, stride=1, padding=1)  # -inf padding: outside is known
    return d / (width + 1)


def make_lowres(x_prev, size, window=None, mode="area"):
    """Level l-1's image (B, 3, L_(l-1), L_(l-1)) -> level l's conditioning input at
    size x size [CDM]: bilinear upsampling (mode 'area') or nearest ('nearest' [imagen-pytorch]).
    Training feeds it downsample(target, L_(l-1), mode).
    window (y, x, c): only that c x c window of the result (training's top-level crops),
    upsampled from the part of x_prev it needs: the same values when size / L_(l-1) is a
    power of two (the sub-pixel positions are then exact in binary)."""
    up_mode = dict(mode="bilinear", align_corners=False) if mode == "area" else dict(mode=mode)
    if window is None:
        return F.interpolate(x_prev, size=(size, size), **up_mode)
    (y, x, c), n = window, x_prev.shape[-1]
    f = size // n
    y0, x0 = max(y // f - 1, 0), max(x // f - 1, 0)  # one source px of margin each side
    y1, x1 = min(-(-(y + c) // f) + 1, n), min(-(-(x + c) // f) + 1, n)
    up = F.interpolate(x_prev[..., y0:y1, x0:x1], size=((y1 - y0) * f, (x1 - x0) * f),
                       **up_mode)
    return up[..., y - y0 * f:y - y0 * f + c, x - x0 * f:x - x0 * f + c]


def cond_channels(preset, stage, level, conditioned=True):
    """Conditioning channels of (stage, level): lowres (level > 0), context (stage > 1), region
    (stage > 1, if the preset has it). conditioned=False: the outpainting baseline's stage 3."""
    lower = stage > 1 and conditioned
    return 3 * (level > 0) + 3 * lower + 3 * (lower and preset.region)


def level_inputs(preset, stage, level, target_or_lowres, context=None,
                 region=None, conditioned=True, window=None):
    """Conditioning channels of (stage, level), in the order the U-Net concatenates them:
    [lowres (level > 0)], [context, region (stage > 1, conditioned; region if the preset has it)],
    all at level size. `target_or_lowres` is level l-1's image (any size; made into the lowres
    input here). window (y, x, c): only that c x c window of them (training's top-level crops;
    training.crop_context 'whole': the context and region whole, resized to c x c, as
    imagen-pytorch resizes its cond_images onto the crop). Returns (B, C, L, L) (or (B, C, c, c))
    or None when there is no conditioning."""
    L = preset.level_sizes[level]
    y, x, c = window or (0, 0, L)
    fit = lambda t: downsample(t, L, preset.resize)[..., y:y + c, x:x + c]
    if window and preset.training.crop_context == "whole":
        fit = lambda t: downsample(t, c, preset.resize)
    parts = []
    if level > 0:
        lowres = downsample(target_or_lowres, preset.level_sizes[level - 1], preset.resize)
        parts.append(make_lowres(lowres, L, window, preset.resize))
    if stage > 1 and conditioned:
        parts += [in_context_range(fit(context), preset)] + ([fit(region)] if preset.region else [])
    return torch.cat(parts, dim=1) if parts else None


def in_context_range(context, preset):
    """A context crop in [-1, 1] as the preset's U-Nets see it (Preset.context_range): itself, or
    imagen's [0, 1]. deviation ((-1, 1): paper_plus, demo): imagen-pytorch leaves cond_images as
    the dataset gives them, in [0, 1]; ours are scaled like the image they condition."""
    lo, hi = preset.context_range
    return context if (lo, hi) == (-1.0, 1.0) else lo + (hi - lo) * (context + 1) / 2


def augmented_channels(preset, stage, level, conditioned=True):
    """How many of the leading conditioning channels the augmentation noises [CDM, Imagen]:
    'lowres' = level l-1's image only (imagen noises lowres_cond_img, never cond_images);
    'all' = every conditioning channel. deviation ('all'): ours also noised context and region."""
    if preset.aug_inputs == "lowres":
        return 3 * (level > 0)
    return cond_channels(preset, stage, level, conditioned)


def augment(preset, stage, level, cond, t_aug, generator=None, conditioned=True):
    """Conditioning augmentation of (stage, level)'s inputs, the one definition for training
    (random t_aug per sample or batch) and sampling (a fixed level) [CDM, Imagen].
    cond: (B, C, L, L) or None; t_aug: float or (B,). Returns (cond, aug_lam): aug_lam (B,)
    is the noise's log-SNR for the U-Net's second embedding; None when nothing is noised."""
    n = augmented_channels(preset, stage, level, conditioned)
    if cond is None or n == 0:
        return cond, None
    noised, aug_lam = sde.augment_cond(cond[:, :n], t_aug, generator, preset.aug_schedule)
    cond = noised if n == cond.shape[1] else torch.cat([noised, cond[:, n:]], dim=1)
    return cond, aug_lam.to(cond.device)


def unet_config(preset, stage, level, conditioned=True):
    """The U-Net config of (stage, level): the preset's named size with its input channels."""
    return unet_mod.get_config(preset.unets[level],
                               cond_ch=cond_channels(preset, stage, level, conditioned),
                               aug_emb=augmented_channels(preset, stage, level, conditioned) > 0)


def denoiser(net, schedule, cond=None, aug_lam=None, bf16=False, ends="clamped"):
    """model_fn(x_t, t) for sde.sample and sde.loss_fn: t -> lam(t) of the level's schedule (with
    the sampler's ends, sde.log_snr) -> net(x_t, lam, cond, aug_lam), optionally under bf16
    autocast. The one wrapper that training and sampling share."""
    def model_fn(x_t, t):
        lam = sde.log_snr(t, schedule, ends).float().to(x_t.device)  # no copy when t is there
        amp = torch.autocast(x_t.device.type, torch.bfloat16) if bf16 else contextlib.nullcontext()
        with amp:
            return net(x_t, lam, cond, aug_lam).float()

    return model_fn


# ---------------------------------------------------------------------- the CDM

class CDM:
    """One stage's cascade of three U-Nets [PAPER Eq. 3]: C_0 from noise, C_l conditioned
    on I_(l-1) (and, for stages 2-3, on context and region)."""

    def __init__(self, preset, stage, nets, conditioned=True, device="cpu", bf16=False):
        # nets: three callables net(x_t, lam, cond, aug_lam) -> v_hat (U-Nets, or closed forms)
        # bf16: run the networks under bfloat16 autocast (the sampler's state stays float32)
        self.preset, self.stage, self.nets = preset, stage, list(nets)
        self.conditioned = conditioned
        self.device, self.bf16 = torch.device(device), bf16

    @torch.no_grad()
    def sample(self, generators, *, known=None, mask=None, context=None,
               region=None, sampling=None):
        """Generate one patch per generator: level 0 from noise, then each level from the one
        below [PAPER Eq. 3].

        generators: list of torch.Generator, one per patch (its only randomness).
        known, mask: (B, 3, P, P) float and (B, 1, P, P) bool, True where pixels are already
          fixed by finished neighbours; None for no inpainting. Held at every level,
          downsampled to its size (a level pixel is known when its whole block is).
        context, region: (B, 3, P, P) float crops of the stage below (stages 2-3).
        sampling: a Sampling (steps, sampler, eta, aug_level, threshold, feather, resample, ends);
          None = the preset's. feather is in px at P, scaled to each level's size.
        Returns (B, 3, P, P) float in [-1, 1] on the CDM's device (no host sync in here); known
        pixels are exact except the last `feather` px next to the new ones."""
        to = lambda t: None if t is None else t.to(self.device)
        x = None  # I_(l-1): level l-1's images
        for level in range(len(self.preset.level_sizes)):
            x = self.sample_level(level, x, generators, to(known), to(mask), to(context),
                                  to(region), sampling or self.preset.sampling)
        return x

    def sample_level(self, level, lower, generators, known, mask, context, region, sp):
        """Level `level`'s images (B, 3, L, L) in [-1, 1], given the level below's (`lower`; None
        at level 0) and the patch's known pixels, context and region (CDM.sample's arguments)."""
        p, B, L = self.preset, len(generators), self.preset.level_sizes[level]
        # The conditioning channels [CDM], noised at sampling's augmentation level [Imagen].
        cond = level_inputs(p, self.stage, level, lower, context, region, self.conditioned)
        cond, aug_lam = augment(p, self.stage, level, cond, sp.aug_level, generators,
                                self.conditioned)
        # The known pixels at this level's size (a level pixel is known when its block is).
        k = m = w = None
        if known is not None:
            k = downsample(known, L, p.resize)
            m = downsample(mask.float(), L) > 0.999
            w = feather_weight(m, sp.feather * L // p.patch)
        # The level's sampler on its U-Net.
        fn = denoiser(self.nets[level], p.schedules[level], cond, aug_lam, self.bf16, sp.ends)
        x = sample_level(fn, (B, 3, L, L), sp, self.stage, level, p, known=k, mask=m, blend=w,
                         generator=generators, device=self.device)
        return x.clamp(-1, 1)


def sample_level(model_fn, shape, sp, stage, level, preset, **inputs):
    """One level's samples with the Sampling `sp`: the paper's loop (sde.sample) when the level's
    rule is 'ancestral' without resampling, else the general one (sde.sample_general: DDIM,
    DPM-Solver++, RePaint). inputs: known, mask, blend, generator, device."""
    kw = dict(steps=sp.level_steps(stage, level), schedule=preset.schedules[level],
              objective=preset.objectives[level], threshold=sp.threshold, ends=sp.ends, **inputs)
    sampler = sp.level_sampler(stage, level)
    if sampler == "ancestral" and sp.resample == 1:
        return sde.sample(model_fn, shape, **kw)
    return sde.sample_general(model_fn, shape, sampler=sampler, eta=sp.eta, resample=sp.resample,
                              **kw)
