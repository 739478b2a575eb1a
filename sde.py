"""Continuous-time VP SDE: schedules, forward process, v-loss, samplers, inpainting.

Everything here is about tensors and noise levels, never about images or tiles.
Time t runs from 0 (data) to 1 (noise); all formulas are written in the log-SNR
lam(t) = log(alpha^2 / sigma^2), with alpha^2 = sigmoid(lam), sigma^2 = sigmoid(-lam)
(variance preserving: alpha^2 + sigma^2 = 1).

A model is any callable `model_fn(x_t, t) -> v_hat` with t of shape (B,) in [0, 1], so
the samplers run with a U-Net or with a closed-form denoiser (see tests/test_sde.py).

References
  [PAPER]    Cechnicka et al., URCDM, MICCAI 2024, Eq. 1-2 (forward / reverse SDE).
  [SDE]      Song et al., Score-based generative modeling through SDEs, ICLR 2021.
  [VDM]      Kingma et al., Variational diffusion models, 2021 (log-SNR view, posterior step).
  [Imagen]   Saharia et al., 2022 (cosine / linear log-SNR, cond. noise augmentation).
  [CDM]      Ho et al., Cascaded diffusion models, 2021 (conditioning augmentation).
  [SDE-v]    Salimans & Ho, Progressive distillation, 2022 (v-parametrisation).
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


# ----------------------------------------------------------------------------- schedules

def log_snr(t, schedule="cosine"):
    """lam(t) for t in [0, 1] (tensor), decreasing in t. [Imagen]"""
    t = torch.as_tensor(t, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008  # lam = -log(cos((t+s)/(1+s) pi/2)^-2 - 1) [Imagen, Nichol & Dhariwal]
        lam = -torch.log(torch.cos((t + s) / (1 + s) * math.pi / 2) ** -2 - 1)
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
    """Broadcast a per-sample (B,) or scalar coefficient against x (B, ...), in x's dtype."""
    a = torch.as_tensor(a, device=x.device).to(x.dtype)
    return a.reshape(a.shape + (1,) * (x.dim() - a.dim())) if a.dim() else a


# ----------------------------------------------------------------------------- forward process

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


def randn(shape, generator=None, device="cpu", dtype=torch.float32):
    """Standard normal noise. `generator` is None, one torch.Generator, or a list with one
    generator per sample (shape[0] of them), so that a sample's noise does not depend on
    the batch it is drawn in [EDM's per-sample generators]."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype) for g in generator]).to(device)
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)


def rand(n, generator=None):
    """n uniform numbers in [0, 1), one per sample when `generator` is a list."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generator])
    return torch.rand(n, generator=generator, dtype=torch.float64)


# ----------------------------------------------------------------------------- training loss

def loss_fn(model_fn, x0, *, schedule="cosine", min_snr_gamma=None, generator=None):
    """v-MSE loss at t ~ U(0, 1) per sample [SDE-v]; optional min-SNR-gamma weight [MinSNR].

    model_fn: callable(x_t, t) -> v_hat. min_snr_gamma: None = plain v-MSE (unit weight),
    else weight = min(SNR, gamma) / (SNR + 1), the v-space form of min-SNR-gamma.
    Returns the scalar mean loss.
    """
    B = x0.shape[0]
    t = rand(B, generator).to(x0.device)
    eps = randn(x0.shape, generator, x0.device, x0.dtype)
    alpha, sigma = alpha_sigma(t, schedule)
    x_t = _bc(alpha, x0) * x0 + _bc(sigma, x0) * eps
    v = v_target(x0, eps, alpha, sigma)
    v_hat = model_fn(x_t, t.to(x0.dtype))
    per_sample = ((v_hat.float() - v.float()) ** 2).flatten(1).mean(1)  # (B,)
    if min_snr_gamma is not None:
        snr = torch.exp(log_snr(t, schedule))
        weight = torch.minimum(snr, torch.full_like(snr, min_snr_gamma)) / (snr + 1)
        per_sample = per_sample * weight.to(per_sample)
    return per_sample.mean()


# ----------------------------------------------------------------------------- conditioning augmentation

def augment_cond(cond, t_aug, generator=None, schedule="cosine"):
    """Noise a conditioning image to level t_aug [CDM, Imagen noise conditioning augmentation].

    cond: (B, C, H, W). t_aug: float (sampling: a fixed level, Imagen uses 0.2) or a (B,)
    tensor (training: random levels). t_aug = 0 returns cond unchanged.
    Returns (noised cond, t_aug as a (B,) tensor) - the U-Net embeds the second value.
    """
    B = cond.shape[0]
    t_aug = torch.as_tensor(t_aug, dtype=torch.float64).expand(B).clone()
    eps = randn(cond.shape, generator, cond.device, cond.dtype)
    keep = (t_aug <= 0).to(cond.device).view(-1, *[1] * (cond.dim() - 1))
    noised = torch.where(keep, cond, q_sample(cond, t_aug, eps))
    return noised, t_aug.to(cond.dtype)


# ----------------------------------------------------------------------------- sampling

def time_grid(steps):
    """t_0 = 1 > t_1 > ... > t_steps = 0, uniform in t."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def _coeffs(t, schedule):
    """(lam, alpha, sigma) at scalar time t; t = 0 is the data itself (alpha 1, sigma 0)."""
    if t <= 0:
        return math.inf, 1.0, 0.0
    lam = float(log_snr(t, schedule))
    a, s = alpha_sigma_from_lam(torch.tensor(lam, dtype=torch.float64))
    return lam, float(a), float(s)


def repaint_jump(x_s, lam_s, lam_t, generator=None):
    """Re-noise x_s (at lam_s) forward to lam_t < lam_s [RePaint]:
    x_t = (alpha_t/alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2) eps,
    so that x_t ~ q(x_t | x_0) whenever x_s ~ q(x_s | x_0)."""
    a_s, s_s = alpha_sigma_from_lam(torch.tensor(lam_s, dtype=torch.float64))
    a_t, s_t = alpha_sigma_from_lam(torch.tensor(lam_t, dtype=torch.float64))
    ratio = float(a_t / a_s)
    std = math.sqrt(max(float(s_t ** 2) - ratio ** 2 * float(s_s ** 2), 0.0))
    return ratio * x_s + std * randn(x_s.shape, generator, x_s.device, x_s.dtype)


def sample(model_fn, shape, *, steps, sampler="ancestral", schedule="cosine", known=None,
           mask=None, blend=None, generator=None, eta=1.0, resample=1, device="cpu", dtype=torch.float32):
    """Draw samples by integrating the reverse process from t = 1 to t = 0.

    model_fn:  callable(x_t (B, ...), t (B,) in [0, 1]) -> v_hat, same shape as x_t.
    shape:     (B, ...) of the samples.
    steps:     number of denoising steps (model calls, times `resample` for RePaint).
    sampler:   'ancestral' (posterior step of the discretised reverse SDE [PAPER Eq. 2]),
               'ddim' (with `eta`; eta = 1 equals 'ancestral', eta = 0 is the ODE), or
               'dpmpp2m' (DPM-Solver++(2M), second-order multistep ODE solver).
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

    def paste(x, alpha, sigma):
        # Replace known pixels by the known image noised to the level of x [RePaint]: the
        # state x is at time s after the step, so known is noised with (alpha_s, sigma_s).
        if not inpaint:
            return x
        if sigma == 0 and blend is not None:  # deviation: feathered final paste (cascade.feather_weight)
            return blend * known + (1 - blend) * x
        noised = alpha * known + sigma * randn(shape, generator, device, dtype) if sigma > 0 else known
        return torch.where(mask, noised, x)

    grid = time_grid(steps)
    x = randn(shape, generator, device, dtype)
    x = paste(x, *_coeffs(float(grid[0]), schedule)[1:])
    x0_prev, h_prev = None, None
    for i in range(steps):
        t, s = float(grid[i]), float(grid[i + 1])
        lam_t, a_t, s_t = _coeffs(t, schedule)
        lam_s, a_s, s_s = _coeffs(s, schedule)
        n_rep = resample if s > 0 else 1  # no jump back from the clean data
        for r in range(n_rep):
            # Denoise.
            v_hat = model_fn(x, torch.full((B,), t, device=device, dtype=dtype))
            x0_hat = x0_from_v(x, v_hat.to(dtype), a_t, s_t)
            # Step t -> s.
            if s <= 0:
                x_new = x0_hat  # last step: the mean with c = 1, no noise
            elif sampler == "dpmpp2m":
                h = (lam_s - lam_t) / 2  # step in log(alpha / sigma) [DPM++]
                D = x0_hat
                if x0_prev is not None and r == 0:
                    ratio = h_prev / h
                    D = (1 + 1 / (2 * ratio)) * x0_hat - 1 / (2 * ratio) * x0_prev
                x_new = (s_s / s_t) * x - a_s * math.expm1(-h) * D
            else:
                c = -math.expm1(lam_t - lam_s)  # c = 1 - exp(lam_t - lam_s) [VDM]
                std = s_s * math.sqrt(c) * (eta if sampler == "ddim" else 1.0)
                if sampler == "ancestral":
                    # posterior mean of q(x_s | x_t, x0_hat) [PAPER Eq. 2 discretised, VDM]
                    mean = a_s * ((1 - c) * x / a_t + c * x0_hat)
                else:
                    # DDIM: x_s = alpha_s x0_hat + sqrt(sigma_s^2 - std^2) eps_hat [DDIM]
                    eps_hat = eps_from_v(x, v_hat.to(dtype), a_t, s_t)
                    mean = a_s * x0_hat + math.sqrt(max(s_s ** 2 - std ** 2, 0.0)) * eps_hat
                x_new = mean + std * randn(shape, generator, device, dtype) if std > 0 else mean
            x_new = paste(x_new, a_s, s_s)
            if r < n_rep - 1:
                x = repaint_jump(x_new, lam_s, lam_t, generator)  # back to t, redo the step
            else:
                x = x_new
        x0_prev, h_prev = x0_hat, (lam_s - lam_t) / 2 if s > 0 else None
    return x
