"""Continuous-time VP SDE: schedules, forward process, v-loss, samplers, inpainting.

Everything here is about tensors and noise levels, never about images or tiles.
Time t runs from 0 (data) to 1 (noise); all formulas are written in the log-SNR
lam(t) = log(alpha^2 / sigma^2), with alpha^2 = sigmoid(lam), sigma^2 = sigmoid(-lam)
(variance preserving: alpha^2 + sigma^2 = 1).

A model is any callable `model_fn(x_t, t) -> v_hat` with t of shape (B,) in [0, 1], so
the samplers run with a U-Net or with a closed-form denoiser (see tests/test_sde.py).
Names: t and s are times (s < t: one step goes from t to s), alpha_t, sigma_t, lam_t their
coefficients; x_t the noisy state; x0_hat, v_hat, eps_hat the model's predictions.

References
  [PAPER]    Cechnicka et al., URCDM, MICCAI 2024, Eq. 1-2 (forward / reverse SDE).
  [SDE]      Song et al., Score-based generative modeling through SDEs, ICLR 2021.
  [VDM]      Kingma et al., Variational diffusion models, 2021 (log-SNR view, posterior step).
  [Imagen]   Saharia et al., 2022 (cosine / linear log-SNR, cond. noise augmentation).
  [CDM]      Ho et al., Cascaded diffusion models, 2021 (conditioning augmentation).
  [SDE-v]    Salimans & Ho, Progressive distillation, 2022 (v-parametrisation).
  [DDPM]     Ho et al., Denoising diffusion probabilistic models, 2020 (eps objective).
  [DDIM]     Song et al., Denoising diffusion implicit models, 2021.
  [DPM++]    Lu et al., DPM-Solver++, 2022 (2M multistep data-prediction solver).
  [RePaint]  Lugmayr et al., RePaint, 2022 (inpainting, resampling jumps).
  [MinSNR]   Hang et al., Efficient diffusion training via min-SNR weighting, 2023.
"""
import hashlib
import math

import torch

SCHEDULES = ("cosine", "linear")
SAMPLERS = ("ancestral", "ddim", "dpmpp2m")
LAM_CLAMP = 30.0  # |lam| bound: cosine gives lam = -inf at t = 1; alpha^2 = sigmoid(-30) ~ 1e-13


# ---------------------------------------------------------------------- schedules

def log_snr(t, schedule="cosine"):
    """lam(t) for t in [0, 1] (tensor), decreasing in t. [Imagen]"""
    t = torch.as_tensor(t, dtype=torch.float64)
    if schedule == "cosine":
        # lam = -log(cos((t+o)/(1+o) pi/2)^-2 - 1), o = 0.008 [Imagen, Nichol & Dhariwal]
        offset = 0.008
        lam = -torch.log(torch.cos((t + offset) / (1 + offset) * math.pi / 2) ** -2 - 1)
    elif schedule == "linear":
        lam = -torch.log(torch.expm1(1e-4 + 10 * t ** 2))  # Imagen's 'linear' beta schedule
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")
    return lam.clamp(-LAM_CLAMP, LAM_CLAMP)


def alpha_sigma_from_lam(lam):
    """alpha, sigma with alpha^2 = sigmoid(lam), sigma^2 = sigmoid(-lam)."""
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def alpha_sigma(t, schedule="cosine"):
    """(alpha_t, sigma_t) at time t (float64 tensors of t's shape)."""
    return alpha_sigma_from_lam(log_snr(t, schedule))


def _bc(a, x):
    """Broadcast a per-sample (B,) or scalar coefficient against x (B, ...), in x's dtype. A Python
    number stays one (no host-to-device copy: the sampling loop's coefficients are numbers)."""
    if isinstance(a, (int, float)):
        return a
    a = torch.as_tensor(a, device=x.device).to(x.dtype)
    return a.reshape(a.shape + (1,) * (x.dim() - a.dim())) if a.dim() else a


# ---------------------------------------------------------------------- forward process

def q_sample(x0, t, eps, schedule="cosine"):
    """x_t = alpha_t x0 + sigma_t eps  [PAPER Eq. 1, solved in closed form for the VP SDE]."""
    alpha, sigma = alpha_sigma(t, schedule)
    return _bc(alpha, x0) * x0 + _bc(sigma, x0) * eps


def v_target(x0, eps, alpha, sigma):
    """v = alpha eps - sigma x0  [SDE-v]."""
    return _bc(alpha, x0) * eps - _bc(sigma, x0) * x0


def x0_from_v(x_t, v_hat, alpha, sigma):
    """x0_hat = alpha x_t - sigma v_hat  [SDE-v]."""
    return _bc(alpha, x_t) * x_t - _bc(sigma, x_t) * v_hat


def eps_from_v(x_t, v_hat, alpha, sigma):
    """eps_hat = sigma x_t + alpha v_hat  [SDE-v]."""
    return _bc(sigma, x_t) * x_t + _bc(alpha, x_t) * v_hat


def derive_seed(*parts):
    """A 63-bit seed from any parts (run seed, stage, patch, step, rank ...): the one seed
    derivation of the project, so every patch and training step has its own generator."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw(fn, shape, generator, device, dtype):
    """fn(shape) drawn from `generator` on `device` when the generator lives there (a CUDA
    generator draws on the GPU: no host work, no copy, no sync; 'meta' takes any generator),
    else where the generator lives, then copied to `device`."""
    device = torch.device(device)
    at = generator.device if generator is not None else torch.device("cpu")
    if device.type in (at.type, "meta"):
        at = device
    return fn(shape, generator=generator, dtype=dtype, device=at).to(device)


def randn(shape, generator=None, device="cpu", dtype=torch.float32):
    """Standard normal noise. `generator` is None, one torch.Generator, or a list with one
    generator per sample (shape[0] of them), so that a sample's noise does not depend on
    the batch it is drawn in [EDM's per-sample generators]."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([draw(torch.randn, shape[1:], g, device, dtype) for g in generator])
    return draw(torch.randn, shape, generator, device, dtype)


def rand(n, generator=None, device=None):
    """n uniform numbers in [0, 1) (float64), one per sample when `generator` is a list; on
    `device`, default: where the (first) generator lives."""
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    device = device or (gens[0].device if gens[0] is not None else "cpu")
    if isinstance(generator, (list, tuple)):
        return torch.cat([draw(torch.rand, (1,), g, device, torch.float64) for g in generator])
    return draw(torch.rand, (n,), generator, device, torch.float64)


# ---------------------------------------------------------------------- what the network predicts

OBJECTIVES = ("v", "eps")


def x0_from_output(out, x_t, alpha_t, sigma_t, objective="v"):
    """The network's output read as x0_hat: from v_hat [SDE-v] or from eps_hat [DDPM]:
    x0_hat = (x_t - sigma_t eps_hat) / alpha_t."""
    if objective == "v":
        return x0_from_v(x_t, out, alpha_t, sigma_t)
    if objective == "eps":
        return (x_t - _bc(sigma_t, x_t) * out) / _bc(alpha_t, x_t)
    raise ValueError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")


def dynamic_threshold(x0_hat, p):
    """Imagen's dynamic thresholding [Imagen Sec. 2.3]: per sample, q = the p-quantile of |x0_hat|,
    q = max(q, 1); x0_hat is clipped to [-q, q] and divided by q, so it lies in [-1, 1]."""
    q = torch.quantile(x0_hat.abs().flatten(1).float(), p, dim=1).clamp(min=1.0)
    q = _bc(q, x0_hat)
    return x0_hat.clamp(-q, q) / q


# ---------------------------------------------------------------------- training loss

def loss_fn(model_fn, x0, *, schedule="cosine", objective="v", min_snr_gamma=None, generator=None):
    """MSE between the network's output and its target at t ~ U(0, 1) per sample: v [SDE-v] or
    eps [DDPM]; optional min-SNR-gamma weight [MinSNR].

    model_fn: callable(x_t, t) -> v_hat (or eps_hat). min_snr_gamma: None = unit weight, else
    min(SNR, gamma) / (SNR + 1) for v and min(SNR, gamma) / SNR for eps (both are the same
    weight, min(SNR, gamma), on the x0 error).
    Returns (losses (B,), t (B,)): the per-sample losses and the times they were drawn at.
    """
    B = x0.shape[0]
    t = rand(B, generator).to(x0.device)
    eps = randn(x0.shape, generator, x0.device, x0.dtype)
    x_t = q_sample(x0, t, eps, schedule)  # [PAPER Eq. 1]
    alpha, sigma = alpha_sigma(t, schedule)
    target = v_target(x0, eps, alpha, sigma) if objective == "v" else eps
    out = model_fn(x_t, t.to(x0.dtype))
    per_sample = ((out.float() - target.float()) ** 2).flatten(1).mean(1)  # (B,)
    if min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(t, schedule,
                                                 min_snr_gamma, objective).to(per_sample)
    return per_sample, t


def min_snr_weight(t, schedule, gamma, objective="v"):
    """[MinSNR] min(SNR, gamma) / (SNR + 1) for the v-loss, min(SNR, gamma) / SNR for eps."""
    snr = torch.exp(log_snr(t, schedule))
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if objective == "v" else clipped / snr


# ---------------------------------------------------------------------- conditioning augmentation

def augment_cond(cond, t_aug, generator=None, schedule="cosine"):
    """Noise a conditioning image to level t_aug [CDM, Imagen noise conditioning augmentation].

    cond: (B, C, H, W). t_aug: float (sampling: a fixed level) or a (B,) tensor (training:
    random levels); t_aug = 0 leaves a sample unchanged. schedule: the log-SNR schedule of the
    augmentation noise (Imagen: its own linear one, whatever the level's schedule).
    Returns (noised cond, aug_lam): aug_lam (B,) float32 is the log-SNR of the noise, which
    the U-Net embeds (one definition for training and sampling).
    """
    B = cond.shape[0]
    t_aug = torch.as_tensor(t_aug, dtype=torch.float64, device=cond.device).expand(B).clone()
    eps = randn(cond.shape, generator, cond.device, cond.dtype)
    keep = (t_aug <= 0).view(-1, *[1] * (cond.dim() - 1))

    noised = torch.where(keep, cond, q_sample(cond, t_aug, eps, schedule))
    return noised, log_snr(t_aug, schedule).float()


# ---------------------------------------------------------------------- sampling: the step rules
# Each rule moves the state from time t to time s < t, given the model's x0_hat at t.
# `noise()` draws fresh standard normal noise (called only by stochastic rules).

def time_grid(steps):
    """t_0 = 1 > t_1 > ... > t_steps = 0, uniform in t."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def _coeffs(t, schedule):
    """(lam, alpha, sigma) at scalar time t; t = 0 is the data itself (alpha 1, sigma 0)."""
    if t <= 0:
        return math.inf, 1.0, 0.0
    lam = float(log_snr(t, schedule))
    alpha, sigma = alpha_sigma_from_lam(torch.tensor(lam, dtype=torch.float64))
    return lam, float(alpha), float(sigma)


def ancestral_step(x_t, x0_hat, lam_t, lam_s, alpha_t, alpha_s, sigma_s, noise):
    """Ancestral sampling: draw x_s from the posterior q(x_s | x_t, x0 = x0_hat), the discretised
    reverse SDE [PAPER Eq. 2; VDM]. With c = 1 - exp(lam_t - lam_s):
        mean = alpha_s ((1 - c) x_t / alpha_t + c x0_hat),   var = sigma_s^2 c."""
    c = -math.expm1(lam_t - lam_s)
    mean = alpha_s * ((1 - c) * x_t / alpha_t + c * x0_hat)
    return mean + sigma_s * math.sqrt(c) * noise()


def ddim_step(x_t, x0_hat, lam_t, lam_s, alpha_t, sigma_t, alpha_s, sigma_s, eta, noise):
    """DDIM [DDIM Eq. 12]: x_s = alpha_s x0_hat + sqrt(sigma_s^2 - std^2) eps_hat + std z, with
    eps_hat = (x_t - alpha_t x0_hat) / sigma_t and std = eta sigma_s sqrt(c). eta = 0 is the
    deterministic ODE sampler; eta = 1 has the ancestral step's variance."""
    c = -math.expm1(lam_t - lam_s)
    std = sigma_s * math.sqrt(c) * eta
    eps_hat = (x_t - alpha_t * x0_hat) / sigma_t
    x_s = alpha_s * x0_hat + math.sqrt(max(sigma_s ** 2 - std ** 2, 0.0)) * eps_hat
    return x_s + std * noise() if std > 0 else x_s


def dpmpp2m_step(x_t, x0_hat, x0_prev, lam_t, lam_s, h_prev, sigma_t, alpha_s, sigma_s):
    """DPM-Solver++(2M) [DPM++ Alg. 2], a second-order multistep ODE solver in h = step of
    log(alpha / sigma) = (lam_s - lam_t) / 2. x0_prev: x0_hat of the previous step (None on the
    first step: a first-order step), h_prev its h.
        D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_prev,  r = h_prev / h
        x_s = (sigma_s / sigma_t) x_t - alpha_s expm1(-h) D"""
    h = (lam_s - lam_t) / 2
    D = x0_hat
    if x0_prev is not None:
        ratio = h_prev / h
        D = (1 + 1 / (2 * ratio)) * x0_hat - 1 / (2 * ratio) * x0_prev
    return (sigma_s / sigma_t) * x_t - alpha_s * math.expm1(-h) * D


def repaint_jump(x_s, lam_s, lam_t, generator=None):
    """Re-noise x_s (at lam_s) forward to lam_t < lam_s [RePaint]:
    x_t = (alpha_t/alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2) eps,
    so that x_t ~ q(x_t | x_0) whenever x_s ~ q(x_s | x_0)."""
    alpha_s, sigma_s = alpha_sigma_from_lam(torch.tensor(lam_s, dtype=torch.float64))
    alpha_t, sigma_t = alpha_sigma_from_lam(torch.tensor(lam_t, dtype=torch.float64))
    ratio = float(alpha_t / alpha_s)
    std = math.sqrt(max(float(sigma_t ** 2) - ratio ** 2 * float(sigma_s ** 2), 0.0))
    return ratio * x_s + std * randn(x_s.shape, generator, x_s.device, x_s.dtype)


# ---------------------------------------------------------------------- sampling: the loop

def sample(model_fn, shape, *, steps, sampler="ancestral", schedule="cosine", objective="v",
           eta=0.0, threshold=None, known=None, mask=None, blend=None, generator=None,
           resample=1, device="cpu", dtype=torch.float32):
    """Draw samples by integrating the reverse process from t = 1 to t = 0.

    model_fn:  callable(x_t (B, ...), t (B,) in [0, 1]) -> the network's output (v_hat or eps_hat).
    shape:     (B, ...) of the samples.
    steps:     number of denoising steps (model calls, times `resample` for RePaint).
    sampler:   'ancestral' [PAPER Eq. 2], 'ddim' (with `eta`; 0 = deterministic) or 'dpmpp2m'.
    objective: what model_fn predicts: 'v' or 'eps'.
    threshold: None, or the quantile p of Imagen's dynamic thresholding of x0_hat (e.g. 0.95).
    known:     None, or a tensor broadcastable to `shape` with pixels held fixed.
    mask:      None, or bool broadcastable to `shape`; True where `known` holds (inpainting
               by replacement; known pixels are exact in the output).
    blend:     None, or float in [0, 1] broadcastable to `shape`, zero where `mask` is False:
               the weight of `known` in the clean output only, x_0 = blend known +
               (1 - blend) x0_hat (a feathered paste, see cascade.feather_weight); None = mask.
    generator: None, a torch.Generator, or a list of one generator per sample.
    resample:  RePaint resampling: each step is redone `resample` times with a forward jump
               in between (1 = no resampling).
    Returns x_0, shape `shape`.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; use one of {SAMPLERS}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    inpaint = known is not None and mask is not None
    if inpaint:
        known = known.to(device, dtype).expand(shape)
        mask = mask.to(device).expand(shape)
        blend = None if blend is None else blend.to(device, dtype).expand(shape)
    B = shape[0]
    noise = lambda: randn(shape, generator, device, dtype)

    def paste(x, alpha, sigma):
        # Replace known pixels by the known image noised to the level of x [RePaint]: the
        # state x is at time s after the step, so known is noised with (alpha_s, sigma_s).
        if not inpaint:
            return x
        # deviation: at the end, a feathered paste of the known pixels (cascade.feather_weight).
        if sigma == 0 and blend is not None:
            return blend * known + (1 - blend) * x
        noised = alpha * known + sigma * noise() if sigma > 0 else known
        return torch.where(mask, noised, x)

    grid = time_grid(steps)
    x = paste(noise(), *_coeffs(float(grid[0]), schedule)[1:])
    x0_prev, h_prev = None, None
    for i in range(steps):
        t, s = float(grid[i]), float(grid[i + 1])
        lam_t, alpha_t, sigma_t = _coeffs(t, schedule)
        lam_s, alpha_s, sigma_s = _coeffs(s, schedule)
        n_rep = resample if s > 0 else 1  # no jump back from the clean data
        for r in range(n_rep):
            # Denoise.
            out = model_fn(x, torch.full((B,), t, device=device, dtype=dtype)).to(dtype)
            x0_hat = x0_from_output(out, x, alpha_t, sigma_t, objective)
            if threshold is not None:
                x0_hat = dynamic_threshold(x0_hat, threshold)
            # Step t -> s.
            if s <= 0:
                x_s = x0_hat  # the last step is the clean prediction, no noise
            elif sampler == "ancestral":
                x_s = ancestral_step(x, x0_hat, lam_t, lam_s, alpha_t, alpha_s, sigma_s, noise)
            elif sampler == "ddim":
                x_s = ddim_step(x, x0_hat, lam_t, lam_s, alpha_t, sigma_t, alpha_s,
                                sigma_s, eta, noise)
            else:
                x_s = dpmpp2m_step(x, x0_hat, x0_prev if r == 0 else None, lam_t, lam_s, h_prev,
                                   sigma_t, alpha_s, sigma_s)
            # Inpaint: hold the known pixels.
            x_s = paste(x_s, alpha_s, sigma_s)
            # RePaint: jump back to t and redo the step.
            x = repaint_jump(x_s, lam_s, lam_t, generator) if r < n_rep - 1 else x_s
        x0_prev, h_prev = x0_hat, (lam_s - lam_t) / 2 if s > 0 else None
    return x
