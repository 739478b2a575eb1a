"""Continuous-time VP SDE: schedules, forward process, losses, samplers, inpainting, distillation.

Everything here is about tensors and noise levels, never about images or tiles.
Time t runs from 0 (data) to 1 (noise); all formulas are written in the log-SNR
lam(t) = log(alpha^2 / sigma^2), with alpha^2 = sigmoid(lam), sigma^2 = sigmoid(-lam)
(variance preserving: alpha^2 + sigma^2 = 1).

A model is any callable `model_fn(x_t, t) -> v_hat` (or eps_hat) with t of shape (B,) in [0, 1],
so the samplers run with a U-Net or with a closed-form denoiser (tests/conftest.py).
Names: t and s are times (s < t: one step goes from t to s), alpha_t, sigma_t, lam_t their
coefficients; x_t the noisy state; x0_hat, v_hat, eps_hat the model's predictions.

Read in order: the schedules, the forward process [PAPER Eq. 1], the training loss, then `sample`,
the paper's sampler [PAPER Eq. 2] as the authors ran it. `sample_general` (DDIM, DPM-Solver++,
RePaint) and progressive distillation come last.

References
  [PAPER]    Cechnicka et al., URCDM, MICCAI 2024, Eq. 1-2 (forward / reverse SDE).
  [SDE]      Song et al., Score-based generative modeling through SDEs, ICLR 2021.
  [VDM]      Kingma et al., Variational diffusion models, 2021 (log-SNR view, posterior step).
  [Imagen]   Saharia et al., 2022 (cosine / linear log-SNR, cond. noise augmentation, dynamic
             thresholding); lucidrains' imagen-pytorch 1.26, the authors' library.
  [CDM]      Ho et al., Cascaded diffusion models, 2021 (conditioning augmentation).
  [SDE-v]    Salimans & Ho, Progressive distillation, 2022 (v-parametrisation).
  [PD]       the same paper: progressive distillation (Alg. 2, truncated-SNR weighting, Sec. 4).
  [DDPM]     Ho et al., Denoising diffusion probabilistic models, 2020 (eps objective).
  [DDIM]     Song et al., Denoising diffusion implicit models, 2021.
  [DPM++]    Lu et al., DPM-Solver++, 2022 (2M multistep data-prediction solver).
  [RePaint]  Lugmayr et al., RePaint, 2022 (inpainting, resampling jumps).
  [MinSNR]   Hang et al., Efficient diffusion training via min-SNR weighting, 2023.
  [EDM]      Karras et al., Elucidating the design space of diffusion models, 2022 (a sampler
             apart from its ablation superset; one generator per sample).
"""
import hashlib
import math

import torch

SCHEDULES = ("cosine", "linear")
SAMPLERS = ("ancestral", "ddim", "dpmpp2m")
ENDS = ("clamped", "imagen")  # how a sampling grid meets t = 1 and t = 0 (log_snr, coeffs)
LAM_CLAMP = 30.0  # |lam| bound: cosine gives lam = -inf at t = 1; alpha^2 = sigmoid(-30) ~ 1e-13


# ---------------------------------------------------------------------- schedules

def log_snr(t, schedule="cosine", ends="clamped"):
    """lam(t) for t in [0, 1] (tensor, float64), decreasing in t [Imagen].
    ends 'clamped': in float64, bounded to +-LAM_CLAMP (the cosine's -inf at t = 1 becomes -30), and
      a sampler takes t = 0 to be the data itself (coeffs). deviation (demo, paper_plus).
    ends 'imagen': imagen_log_snr, as the authors' library computes it (`paper`)."""
    if ends == "imagen":
        return imagen_log_snr(t, schedule)
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


def imagen_log_snr(t, schedule="cosine"):
    """lam(t) as imagen-pytorch 1.26 computes it: the same formulas in float32 (returned as
    float64), the cosine's log taken of at least 1e-5. Finite at both ends: float32's pi / 2 lies
    4.4e-8 past pi / 2, so the cosine's lam(1) is -33.89 (float64: -inf); lam(0) is 8.77 (cosine)
    or 9.21 (linear), where a sampler's last step goes (coeffs)."""
    t = torch.as_tensor(t).to(torch.float32)
    if schedule == "cosine":
        x = torch.cos((t + 0.008) / (1 + 0.008) * math.pi * 0.5) ** -2 - 1
        lam = -torch.log(x.clamp(min=1e-5))
    elif schedule == "linear":
        lam = -torch.log(torch.special.expm1(1e-4 + 10 * t ** 2))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")
    return lam.double()


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


# ---------------------------------------------------------------------- the paper's sampler
# A sampling loop moves the state x from t = 1 (noise) to t = 0 (data) on a uniform grid. Its pieces
# are shared with the general sampler below: `coeffs` (the schedule at a grid time), `predict_x0`
# (the network's clean image), `paste` (inpainting by replacement), `ancestral_step` (Eq. 2).

def time_grid(steps):
    """t_0 = 1 > t_1 > ... > t_steps = 0, uniform in t."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def coeffs(t, schedule, ends="clamped"):
    """(lam, alpha, sigma) at a scalar grid time t, as Python numbers. With 'clamped' ends t = 0 is
    the data itself (lam = +inf, alpha 1, sigma 0); with 'imagen' ends lam(0) is finite."""
    if t <= 0 and ends == "clamped":
        return math.inf, 1.0, 0.0
    lam = float(log_snr(t, schedule, ends))
    alpha, sigma = alpha_sigma_from_lam(torch.tensor(lam, dtype=torch.float64))
    return lam, float(alpha), float(sigma)


def predict_x0(model_fn, x_t, t, alpha_t, sigma_t, objective="v", threshold=None):
    """The network's clean image x0_hat at grid time t: its output read as v or eps
    (x0_from_output), dynamically thresholded when `threshold` is given [Imagen]."""
    t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=x_t.dtype)
    x0_hat = x0_from_output(model_fn(x_t, t_batch).to(x_t.dtype), x_t, alpha_t, sigma_t, objective)
    return x0_hat if threshold is None else dynamic_threshold(x0_hat, threshold)


def ancestral_step(x_t, x0_hat, lam_t, lam_s, alpha_t, alpha_s, sigma_s, noise=None):
    """Ancestral sampling: a draw of x_s from the posterior q(x_s | x_t, x0 = x0_hat), the
    discretised reverse SDE [PAPER Eq. 2; VDM]. With c = 1 - exp(lam_t - lam_s):
        mean = alpha_s ((1 - c) x_t / alpha_t + c x0_hat),   var = sigma_s^2 c.
    noise: draws standard normal noise; None on the last step, which returns the mean: x0_hat
    itself when s is the data (lam_s = +inf, c = 1)."""
    if lam_s == math.inf:
        return x0_hat
    c = -math.expm1(lam_t - lam_s)
    mean = alpha_s * ((1 - c) * x_t / alpha_t + c * x0_hat)
    return mean if noise is None else mean + sigma_s * math.sqrt(c) * noise()


def inpainting(known, mask, blend, shape, device, dtype):
    """known, mask, blend on the samples' device, expanded to `shape` (all None: no inpainting)."""
    if known is None or mask is None:
        return None, None, None
    blend = None if blend is None else blend.to(device, dtype).expand(shape)
    return known.to(device, dtype).expand(shape), mask.to(device).expand(shape), blend


def paste(x, known, mask, alpha, sigma, noise):
    """Inpainting by replacement [RePaint]: where `mask`, x becomes the known pixels noised to the
    level of x, alpha known + sigma eps (an off-by-one level here leaves a visible seam)."""
    return x if mask is None else torch.where(mask, alpha * known + sigma * noise(), x)


def final_paste(x, known, mask, blend):
    """The known pixels exact in the output; or, with `blend`, blend known + (1 - blend) x.
    deviation (blend, the demo's feather): the last px feathered in (cascade.feather_weight)."""
    if mask is None:
        return x
    return torch.where(mask, known, x) if blend is None else blend * known + (1 - blend) * x


def sample(model_fn, shape, *, steps, schedule="cosine", objective="v", threshold=None, known=None,
           mask=None, blend=None, generator=None, ends="clamped", device="cpu",
           dtype=torch.float32):
    """The paper's sampler [PAPER Eq. 2], as the authors' library runs it (imagen-pytorch's
    p_sample_loop): `steps` ancestral steps from t = 1 to t = 0 on a uniform grid, Imagen's dynamic
    thresholding, inpainting by replacement.

    model_fn:  callable(x_t (B, ...), t (B,) in [0, 1]) -> the network's output (v_hat or eps_hat).
    shape:     (B, ...) of the samples.
    steps:     denoising steps (network calls).
    schedule:  the log-SNR schedule (SCHEDULES); objective: what model_fn predicts, 'v' or 'eps'.
    threshold: None, or the quantile p of Imagen's dynamic thresholding of x0_hat (0.95).
    known:     None, or a tensor broadcastable to `shape` whose pixels are held where `mask` (bool,
               broadcastable) is True: inpainting; they are exact in the output.
    blend:     None, or float weights of `known` in the output (zero where mask is False).
    generator: None, a torch.Generator, or a list of one generator per sample (randn).
    ends:      the schedule's two ends (log_snr): 'imagen' (`paper`) or 'clamped'.
    Returns x_0, shape `shape`.

    Why the ends matter. 'imagen' feeds the network imagen's finite lam(1) (-33.89 with the cosine
    schedule), not the clamp's -30: imagen's U-Net embeds lam with learned Fourier features, which
    turn those 3.9 units of log-SNR into whole turns, so the first x0_hat moves visibly. The last
    step then goes to the schedule's finite lam(0) (cosine 8.77, linear 9.21): its mean keeps a
    trace of x_t's noise, about a grey level at the top level, which stays in the slide's pixels.
    After the authors' 1024 / 256 steps neither shows; at a few steps both do."""
    noise = lambda: randn(shape, generator, device, dtype)
    known, mask, blend = inpainting(known, mask, blend, shape, device, dtype)
    grid = time_grid(steps)
    x = noise()                                                           # x_1 ~ N(0, I)
    for i in range(steps):
        t, s = float(grid[i]), float(grid[i + 1])
        lam_t, alpha_t, sigma_t = coeffs(t, schedule, ends)
        lam_s, alpha_s, sigma_s = coeffs(s, schedule, ends)
        # Inpaint: the known pixels, noised to t, replace x's [RePaint; imagen's p_sample_loop].
        x = paste(x, known, mask, alpha_t, sigma_t, noise)
        # Denoise: the network's x0_hat, dynamically thresholded [Imagen].
        x0_hat = predict_x0(model_fn, x, t, alpha_t, sigma_t, objective, threshold)
        # Step t -> s: a draw from q(x_s | x_t, x0 = x0_hat) [PAPER Eq. 2]; the last, its mean.
        x = ancestral_step(x, x0_hat, lam_t, lam_s, alpha_t, alpha_s, sigma_s,
                           noise if i < steps - 1 else None)
    # The known pixels exact.
    return final_paste(x, known, mask, blend)


# ---------------------------------------------------------------------- the general sampler
# Faster step rules and RePaint's resampling, which no preset's default uses but `paper_plus`'s
# DPM-Solver++ and the distilled models' DDIM (cascade.CDM picks this loop only when asked).

def ddim_step(x_t, x0_hat, lam_t, lam_s, alpha_t, sigma_t, alpha_s, sigma_s, eta, noise):
    """DDIM [DDIM Eq. 12]: x_s = alpha_s x0_hat + sqrt(sigma_s^2 - std^2) eps_hat + std z, with
    eps_hat = (x_t - alpha_t x0_hat) / sigma_t and std = eta sigma_s sqrt(c). eta = 0 is the
    deterministic ODE sampler; eta = 1 has the ancestral step's variance. noise None: no noise."""
    c = -math.expm1(lam_t - lam_s)
    std = sigma_s * math.sqrt(c) * eta if noise is not None else 0.0
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


def sample_general(model_fn, shape, *, steps, sampler="ddim", schedule="cosine", objective="v",
                   eta=0.0, threshold=None, known=None, mask=None, blend=None, generator=None,
                   resample=1, ends="clamped", device="cpu", dtype=torch.float32):
    """`sample` with other step rules and RePaint's resampling [EDM's ablation_sampler beside its
    sampler]; with sampler 'ancestral' and resample 1 it gives `sample`'s pixels.

    sampler:  'ancestral' [PAPER Eq. 2], 'ddim' (with `eta` in [0, 1]; 0 = deterministic, the
              distilled models' rule) or 'dpmpp2m' (DPM-Solver++(2M)).
    resample: RePaint [RePaint]: each step but the last is run `resample` times, jumping back to t
              in between (repaint_jump), so the known and new pixels harmonise (1 = off).
    Other arguments as `sample`. The known pixels are pasted after each step at the level s the
    state is at (RePaint's order; `sample` pastes before each call, at t: the same draws).
    deviation (`paper` with --resample R > 1): imagen-pytorch's inpaint_resample_times differs in
    its jump noise, its paste order and its last step (docs/departures.md)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; use one of {SAMPLERS}")
    noise = lambda: randn(shape, generator, device, dtype)
    known, mask, blend = inpainting(known, mask, blend, shape, device, dtype)
    grid = time_grid(steps)
    x = paste(noise(), known, mask, *coeffs(1.0, schedule, ends)[1:], noise)
    x0_prev = h_prev = None
    for i in range(steps):
        t, s, last = float(grid[i]), float(grid[i + 1]), i == steps - 1
        lam_t, alpha_t, sigma_t = coeffs(t, schedule, ends)
        lam_s, alpha_s, sigma_s = coeffs(s, schedule, ends)
        repeats = 1 if last else resample  # no jump back from the last step
        for r in range(repeats):
            # Denoise.
            x0_hat = predict_x0(model_fn, x, t, alpha_t, sigma_t, objective, threshold)
            # Step t -> s.
            if lam_s == math.inf:  # s is the data: the clean prediction
                x_s = x0_hat
            elif sampler == "ancestral":
                x_s = ancestral_step(x, x0_hat, lam_t, lam_s, alpha_t, alpha_s, sigma_s,
                                     None if last else noise)
            elif sampler == "ddim":
                x_s = ddim_step(x, x0_hat, lam_t, lam_s, alpha_t, sigma_t, alpha_s, sigma_s, eta,
                                None if last else noise)
            else:
                x_s = dpmpp2m_step(x, x0_hat, x0_prev if r == 0 else None, lam_t, lam_s, h_prev,
                                   sigma_t, alpha_s, sigma_s)
            # Inpaint: hold the known pixels, noised to s (at the last step: exact, below).
            x_s = x_s if last else paste(x_s, known, mask, alpha_s, sigma_s, noise)
            # RePaint: jump back to t and redo the step.
            x = repaint_jump(x_s, lam_s, lam_t, generator) if r < repeats - 1 else x_s
        x0_prev, h_prev = x0_hat, (lam_s - lam_t) / 2
    return final_paste(x, known, mask, blend)


# ---------------------------------------------------------------------- progressive distillation
# A student of N steps learns to do in one deterministic (DDIM) step what its teacher does in two:
# t -> t - 1/2N -> t - 1/N [PD Alg. 2]. Round after round N halves (train.py --distill).
#
# The target. DDIM from t to s with a clean-image estimate x0 is
#     z_s = alpha_s x0 + (sigma_s / sigma_t) (z_t - alpha_t x0).                        (1)
# The teacher takes two such steps from z_t, to t' = t - 1/2N and t'' = t - 1/N, landing at z_t''.
# The student takes one, from z_t to t'', with its own x0_hat. For it to land on z_t'', (1) with
# s = t'' must hold with x0 = x_tilde:
#     z_t'' = alpha_t'' x_tilde + (sigma_t'' / sigma_t) (z_t - alpha_t x_tilde)
#  => x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t).
# The denominator is > 0 because alpha / sigma grows as t falls. At t'' = 0 (the data: alpha 1,
# sigma 0) x_tilde is the teacher's last x0_hat. The student's network predicts v or eps, so the
# target is x_tilde read in that parametrisation at z_t: v = (alpha_t z_t - x_tilde) / sigma_t,
# eps = (z_t - alpha_t x_tilde) / sigma_t (the inverses of x0_from_output).

EPS_WEIGHT_MAX = 1e4  # distill_weight's bound for eps students (alpha -> 0 at t = 1)


def grid_alpha_sigma(t, schedule, ends="clamped"):
    """(alpha, sigma) float64 at grid times t (B,), with `coeffs`'s ends: t = 0 is the data
    (alpha 1, sigma 0) with 'clamped' ends."""
    t = torch.as_tensor(t, dtype=torch.float64)
    alpha, sigma = alpha_sigma_from_lam(log_snr(t, schedule, ends).to(t.device))
    if ends == "clamped":
        alpha, sigma = torch.where(t <= 0, 1.0, alpha), torch.where(t <= 0, 0.0, sigma)
    return alpha, sigma


def ddim_to(z_t, x0, alpha_t, sigma_t, alpha_s, sigma_s):
    """The deterministic DDIM step (1) from t to s with per-sample coefficients (B,)."""
    return _bc(alpha_s, z_t) * x0 + _bc(sigma_s / sigma_t, z_t) * (z_t - _bc(alpha_t, z_t) * x0)


def output_from_x0(x0, z_t, alpha_t, sigma_t, objective="v"):
    """What a network predicting v or eps outputs at z_t for the clean image x0 (x0_from_output's
    inverse): v = (alpha_t z_t - x0) / sigma_t, eps = (z_t - alpha_t x0) / sigma_t."""
    if objective == "v":
        return (_bc(alpha_t, z_t) * z_t - x0) / _bc(sigma_t, z_t)
    if objective == "eps":
        return (z_t - _bc(alpha_t, z_t) * x0) / _bc(sigma_t, z_t)
    raise ValueError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")


def distill_target(teacher_fn, z_t, t, steps, *, schedule, objective="v", threshold=None,
                   ends="clamped"):
    """The student's target at z_t (B, ...), t (B,) on the grid of a `steps`-step student: two
    teacher DDIM steps t -> t - 1/2N -> t - 1/N, then x_tilde as derived above [PD Alg. 2].
    teacher_fn(x, t) -> output in `objective`; threshold: the teacher's dynamic thresholding, as it
    samples. Returns (the target in `objective`, x_tilde)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=z_t.device)
    t1, t2 = (t - 0.5 / steps).clamp(min=0), (t - 1.0 / steps).clamp(min=0)
    (a_t, s_t), (a_1, s_1), (a_2, s_2) = (grid_alpha_sigma(u, schedule, ends) for u in (t, t1, t2))

    def teacher_x0(z, u, alpha, sigma):  # the teacher's (thresholded) clean image
        x0 = x0_from_output(teacher_fn(z, u.to(z.dtype)).to(z.dtype), z, alpha, sigma, objective)
        return x0 if threshold is None else dynamic_threshold(x0, threshold)

    z_1 = ddim_to(z_t, teacher_x0(z_t, t, a_t, s_t), a_t, s_t, a_1, s_1)      # t -> t'
    z_2 = ddim_to(z_1, teacher_x0(z_1, t1, a_1, s_1), a_1, s_1, a_2, s_2)     # t' -> t''
    ratio = s_2 / s_t
    x_tilde = (z_2 - _bc(ratio, z_t) * z_t) / _bc(a_2 - ratio * a_t, z_t)
    return output_from_x0(x_tilde, z_t, a_t, s_t, objective), x_tilde


def distill_weight(alpha, sigma, objective="v"):
    """The weight on the squared error of the student's output that makes it the truncated-SNR
    weight max(SNR, 1) on its x0 error [PD Sec. 4]. v: x0_hat = alpha z_t - sigma v_hat, so
    |d x0| = sigma |d v| and the weight is max(SNR, 1) sigma^2 = max(alpha^2, sigma^2), in [1/2, 1].
    eps: |d x0| = (sigma / alpha) |d eps|, weight max(alpha^2, sigma^2) / alpha^2, which grows
    without bound as alpha -> 0 at t = 1, where an eps output cannot say x0 [PD Sec. 4].
    deviation (eps students, `paper`'s level 0): bounded at EPS_WEIGHT_MAX."""
    w = torch.maximum(alpha ** 2, sigma ** 2)
    return w if objective == "v" else (w / alpha ** 2).clamp(max=EPS_WEIGHT_MAX)


def distill_loss(student_fn, teacher_fn, x0, *, steps, schedule="cosine", objective="v",
                 threshold=None, ends="clamped", generator=None):
    """Progressive distillation's loss for a student of `steps` steps [PD Alg. 2]: per sample a
    grid time t = i / steps, i ~ U{1, ..., steps}; z_t = alpha_t x0 + sigma_t eps [PAPER Eq. 1];
    the squared error between the student's output and distill_target's, in the student's own
    parametrisation, weighted by distill_weight. x0 (B, ...) are training images (the data, as in
    PD). Returns (per-sample losses (B,), t (B,))."""
    B = x0.shape[0]
    t = ((rand(B, generator) * steps).floor().clamp(max=steps - 1) + 1).to(x0.device) / steps
    eps = randn(x0.shape, generator, x0.device, x0.dtype)
    alpha, sigma = grid_alpha_sigma(t, schedule, ends)
    z_t = _bc(alpha, x0) * x0 + _bc(sigma, x0) * eps
    with torch.no_grad():
        target, _ = distill_target(teacher_fn, z_t, t, steps, schedule=schedule,
                                   objective=objective, threshold=threshold, ends=ends)
    out = student_fn(z_t, t.to(x0.dtype))
    per_sample = ((out.float() - target.float()) ** 2).flatten(1).mean(1)  # (B,)
    return per_sample * distill_weight(alpha, sigma, objective).to(per_sample), t
