"""sde.py: equations, forward marginals, samplers against closed-form oracles."""
import math

import pytest
import torch

import sde
from conftest import gaussian_oracle

N = 1 << 16  # samples for statistical tests: SE(mean) = s/256, SE(std) ~ s/362


def test_schedule_endpoints_and_monotone():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for schedule in sde.SCHEDULES:
        lam = sde.log_snr(t, schedule)
        assert torch.all(lam[1:] < lam[:-1]), schedule
        alpha, sigma = sde.alpha_sigma(t, schedule)
        # variance preserving
        torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(t))
    # closed forms: cosine lam(0) = -2 log tan(s/(1+s) pi/2); linear lam(0) = -log(expm1(1e-4))
    s = 0.008
    lam0 = -2 * math.log(math.tan(s / (1 + s) * math.pi / 2))
    assert float(sde.log_snr(0.0, "cosine")) == pytest.approx(lam0)

    assert float(sde.log_snr(0.0, "linear")) == pytest.approx(-math.log(math.expm1(1e-4)))
    assert float(sde.log_snr(1.0, "cosine")) == -sde.LAM_CLAMP


def test_v_parametrisation_identities():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
    alpha, sigma = sde.alpha_sigma(t)
    x_t = sde.q_sample(x0, t, eps)
    v = sde.v_target(x0, eps, alpha, sigma)
    torch.testing.assert_close(sde.x0_from_v(x_t, v, alpha, sigma), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sde.eps_from_v(x_t, v, alpha, sigma), eps, atol=1e-5, rtol=1e-5)


def test_q_sample_marginals():
    x0 = torch.full((N,), 0.7)
    eps = torch.randn(N, generator=torch.Generator().manual_seed(1))
    alpha, sigma = (float(a) for a in sde.alpha_sigma(0.4))
    x_t = sde.q_sample(x0, torch.tensor(0.4), eps)
    assert float(x_t.mean()) == pytest.approx(alpha * 0.7, abs=5 * sigma / N ** 0.5)
    assert float(x_t.std()) == pytest.approx(sigma, abs=5 * sigma / (2 * N) ** 0.5)


def test_repaint_jump_variance():
    """Jumping x_s ~ q(x_s|x0) forward to t gives q(x_t|x0): var = alpha_t^2 s^2 + sigma_t^2 and
    Cov(x_t, x0) = alpha_t s^2 (imagen-pytorch's q_sample_from_to adds far too little noise)."""
    g = torch.Generator().manual_seed(2)
    s0 = 0.5
    x0 = s0 * torch.randn(N, generator=g, dtype=torch.float64)
    lam_s, lam_t = float(sde.log_snr(0.3)), float(sde.log_snr(0.6))
    a_s, sg_s = sde.alpha_sigma_from_lam(torch.tensor(lam_s))
    a_t, sg_t = (float(v) for v in sde.alpha_sigma_from_lam(torch.tensor(lam_t)))
    x_s = a_s * x0 + sg_s * torch.randn(N, generator=g, dtype=torch.float64)
    x_t = sde.repaint_jump(x_s, lam_s, lam_t, g)
    var = a_t ** 2 * s0 ** 2 + sg_t ** 2
    assert float(x_t.var()) == pytest.approx(var, rel=5 * (2 / N) ** 0.5)
    cov = float(((x_t - x_t.mean()) * x0).mean())
    assert cov == pytest.approx(a_t * s0 ** 2, abs=5 * (var * s0 ** 2 / N) ** 0.5)


# Steps at which each sampler's discretisation bias on the std is below 1 % of s (measured:
# ancestral ~ O(1/N) with ~0.35 s/N, ddim(eta=0) ~ 0.6 s/N on the linear schedule, dpmpp2m ~
# O(1/N^2)).
CONVERGED_STEPS = {"ancestral": 400, "ddim": 300, "dpmpp2m": 40}


@pytest.mark.parametrize("schedule", sde.SCHEDULES)
@pytest.mark.parametrize("sampler", sde.SAMPLERS)
def test_sampler_reproduces_gaussian(sampler, schedule):
    """x0 ~ N(mu, s^2) with the exact denoiser: the samples have mean mu and std s within
    5 standard errors plus a 1 % discretisation allowance (docs/design.md, "Diffusion")."""
    mu, s = 0.3, 0.5
    x = sde.sample_general(gaussian_oracle(mu, s, schedule), (N,), steps=CONVERGED_STEPS[sampler],
                   sampler=sampler,
                   schedule=schedule, generator=torch.Generator().manual_seed(3), eta=0.0)
    assert abs(float(x.mean()) - mu) < 5 * s / N ** 0.5 + 0.01 * s
    assert abs(float(x.std()) - s) < 5 * s / (2 * N) ** 0.5 + 0.01 * s


@pytest.mark.parametrize("sampler", sde.SAMPLERS)
def test_sampler_converges_with_steps(sampler):
    mu, s = 0.3, 0.5
    err = []
    for steps in (4, 16, 64):
        x = sde.sample_general(gaussian_oracle(mu, s), (N,), steps=steps, sampler=sampler,
                       generator=torch.Generator().manual_seed(4), eta=0.0)
        err.append(abs(float(x.std()) - s))
    assert err[0] > err[1] > err[2], err
    assert err[2] < err[0] / 4, err


def test_ddim_eta1_equals_ancestral():
    fn = gaussian_oracle(0.1, 0.8)
    a = sde.sample(fn, (64,), steps=10,
                   generator=torch.Generator().manual_seed(5))
    b = sde.sample_general(fn, (64,), steps=10, sampler="ddim", eta=1.0,
                   generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _bivariate(rho):
    """Exact v-predictor for x0 ~ N(0, [[1, rho], [rho, 1]]): x0_hat = alpha K (alpha^2 K + sigma^2
    I)^-1 x_t."""
    d, U = torch.linalg.eigh(torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64))

    def model_fn(x, t):
        alpha, sigma = (v[:, None] for v in sde.alpha_sigma(t.double()))
        x0_hat = ((x.double() @ U) * (alpha * d / (alpha ** 2 * d + sigma ** 2))) @ U.T
        return ((alpha * x.double() - x0_hat) / sigma).to(x.dtype)
    return model_fn


@pytest.mark.parametrize("sampler", sde.SAMPLERS)
def test_inpainting_known_exact_and_conditional(sampler):
    """Pixel 0 known (= 1), pixel 1 correlated with it (rho = 0.9): known pixels come back exactly;
    the unknown pixel must follow N(rho, 1 - rho^2). Plain replacement is biased towards the prior
    (measured mean ~0.62 instead of 0.90); RePaint resampling (10 jumps) removes most of the
    bias."""
    rho, n = 0.9, 1 << 14
    known = torch.tensor([1.0, 0.0]).expand(n, 2)
    mask = torch.tensor([True, False]).expand(n, 2)
    out = {}
    for resample in (1, 10):
        x = sde.sample_general(_bivariate(rho), (n, 2), steps=50, sampler=sampler, known=known,
                               mask=mask,
                       resample=resample, generator=torch.Generator().manual_seed(6))
        assert torch.equal(x[:, 0], known[:, 0])
        out[resample] = (float(x[:, 1].mean()), float(x[:, 1].std()))
    sd = (1 - rho ** 2) ** 0.5
    assert abs(out[10][0] - rho) < 0.07 and abs(out[10][1] - sd) < 0.05, out
    assert abs(out[10][0] - rho) < abs(out[1][0] - rho) / 3, out


def test_blend_is_a_final_linear_paste():
    """`blend` changes only the clean composite: the trajectory is the same, so the output is linear
    in blend (0 gives the model's own x0_hat of the known pixel, mask.float() the hard paste)."""
    n = 256
    known, mask = torch.tensor([1.0, 0.0]).expand(n, 2), torch.tensor([True, False]).expand(n, 2)
    run = lambda blend: sde.sample(_bivariate(0.9), (n, 2), steps=20, known=known, mask=mask,
                                   blend=blend,
                                   generator=torch.Generator().manual_seed(3))
    hard, b1, b0, half = run(None), run(mask.float()), run(torch.zeros(n, 2)), run(mask.float() / 2)
    assert torch.equal(hard, b1)
    # x0_hat is not known
    assert torch.equal(b0[:, 1], hard[:, 1]) and (b0[:, 0] - 1).abs().mean() > 0.05
    torch.testing.assert_close(half, (b0 + b1) / 2)


def test_fixed_seed_and_per_sample_generators():
    fn = gaussian_oracle(0.0, 1.0)
    run = lambda seed: sde.sample(fn, (3, 5), steps=5,
                                  generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(7), run(7)) and not torch.equal(run(7), run(8))
    # One generator per sample: sample k does not depend on what else is in the batch.
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    batch = sde.sample(fn, (3, 5), steps=5, generator=gens([10, 11, 12]))
    alone = sde.sample(fn, (1, 5), steps=5, generator=gens([11]))
    assert torch.equal(batch[1:2], alone)


def test_loss_oracle_and_min_snr():
    mu, s = 0.3, 0.5
    x0 = mu + s * torch.randn(4096, 4, generator=torch.Generator().manual_seed(8))
    oracle = gaussian_oracle(mu, s)
    zero = lambda x, t: torch.zeros_like(x)
    l_oracle = sde.loss_fn(oracle, x0, generator=torch.Generator().manual_seed(9))[0].mean()
    l_zero = sde.loss_fn(zero, x0, generator=torch.Generator().manual_seed(9))[0].mean()
    # E[(v_hat - v)^2] = Var(x0 | x_t) / sigma^2 = s^2 / (alpha^2 s^2 + sigma^2), averaged over t ~
    # U(0, 1)
    alpha, sigma = sde.alpha_sigma(torch.linspace(0, 1, 20001, dtype=torch.float64))
    expected = float((s ** 2 / (alpha ** 2 * s ** 2 + sigma ** 2)).mean())
    assert float(l_oracle) == pytest.approx(expected, rel=0.05)
    assert float(l_oracle) < float(l_zero)
    # min-SNR-gamma never increases the weight: weight = min(snr, g)/(snr+1) <= 1
    l_w = sde.loss_fn(zero, x0, min_snr_gamma=5.0,
                      generator=torch.Generator().manual_seed(9))[0].mean()
    assert float(l_w) < float(l_zero)


def test_augment_cond():
    cond = torch.rand(2, 3, 4, 4)
    same, lam0 = sde.augment_cond(cond, 0.0)
    assert torch.equal(same, cond) and torch.equal(lam0, sde.log_snr(torch.zeros(2)).float())
    noised, t = sde.augment_cond(cond, torch.tensor([0.0, 0.5]), torch.Generator().manual_seed(1))
    assert torch.equal(noised[0], cond[0]) and not torch.equal(noised[1], cond[1])


def test_the_loss_is_the_v_error_at_the_forward_processs_x_t():
    """loss_fn's per-sample loss is |v_hat - v|^2 at x_t = alpha_t x0 + sigma_t eps [PAPER Eq. 1;
    SDE-v], t and eps the generator's draws in that order: a model answering x_t itself gives
    |x_t - v|^2, computed here from the same draws. Seen failing with x_t = x0 (q_sample's
    result ignored) and with the target eps instead of v."""
    x0 = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(1))
    losses, t = sde.loss_fn(lambda x, t: x, x0, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    t_ref = sde.rand(4, g)
    eps = sde.randn(x0.shape, g)
    alpha, sigma = (a.view(-1, 1, 1).float() for a in sde.alpha_sigma(t_ref))
    x_t, v = alpha * x0 + sigma * eps, alpha * eps - sigma * x0
    torch.testing.assert_close(t, t_ref)
    torch.testing.assert_close(losses, ((x_t - v) ** 2).flatten(1).mean(1))


# ---------------------------------------------------------------------- the two samplers

@pytest.mark.parametrize("threshold", [None, 0.9])
def test_the_papers_sampler_is_the_general_one_at_its_settings(threshold):
    """sde.sample (the paper's loop) and sde.sample_general with 'ancestral' and no resampling
    give the same pixels, bit for bit, inpainting and thresholding included: the general sampler
    is a superset, not another algorithm."""
    n = 64
    known, mask = torch.tensor([1.0, 0.0]).expand(n, 2), torch.tensor([True, False]).expand(n, 2)
    kw = dict(steps=7, known=known, mask=mask, threshold=threshold, schedule="linear")
    a = sde.sample(_bivariate(0.7), (n, 2), generator=torch.Generator().manual_seed(3), **kw)
    b = sde.sample_general(_bivariate(0.7), (n, 2), sampler="ancestral", resample=1,
                           generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------- progressive distillation

def _eps_oracle(mu, s, schedule):
    """gaussian_oracle's exact denoiser with an eps output (eps_hat = sigma x_t + alpha v_hat)."""
    v_fn = gaussian_oracle(mu, s, schedule)

    def model_fn(x, t):
        alpha, sigma = (a.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
                        for a in sde.alpha_sigma(t.double(), schedule))
        return sigma * x + alpha * v_fn(x, t)
    return model_fn


@pytest.mark.parametrize("objective", ["v", "eps"])
@pytest.mark.parametrize("schedule", sde.SCHEDULES)
def test_one_student_step_on_the_exact_target_is_two_teacher_steps(objective, schedule):
    """[PD Alg. 2] with the closed-form teacher: at t = 1, 3/4, 1/2, 1/4 of a 4-step student, one
    DDIM step t -> t - 1/4 from the output distill_target asks for lands where two teacher DDIM
    steps (sde.ddim_step, the sampler's own rule) land; and a whole 4-step student sampler fed
    that output equals the teacher's 8-step DDIM sampler from the same noise. Seen failing with
    x_tilde = z_t'' (the target's algebra skipped) and with the two steps to t - 1/2N only."""
    teacher = (gaussian_oracle if objective == "v" else _eps_oracle)(0.3, 0.5, schedule)
    N, z = 4, torch.randn(512, generator=torch.Generator().manual_seed(5)).double()
    for t in (1.0, 0.75, 0.5, 0.25):
        tt = torch.full((512,), t, dtype=torch.float64)
        target, _ = sde.distill_target(teacher, z, tt, N, schedule=schedule, objective=objective)
        (lt, at, st), (l1, a1, s1), (l2, a2, s2) = (sde.coeffs(u, schedule)
                                                    for u in (t, t - 0.5 / N, t - 1.0 / N))
        x0 = lambda fn, x, u, a, s: sde.x0_from_output(
            fn(x, torch.full((512,), u, dtype=torch.float64)), x, a, s, objective)
        one = sde.ddim_to(z, x0(lambda x, u: target, z, t, at, st),
                          *(torch.tensor(v, dtype=torch.float64) for v in (at, st, a2, s2)))
        z1 = sde.ddim_step(z, x0(teacher, z, t, at, st), lt, l1, at, st, a1, s1, 0.0, None)
        two = x0(teacher, z1, t - 0.5 / N, a1, s1) if s2 == 0 else sde.ddim_step(
            z1, x0(teacher, z1, t - 0.5 / N, a1, s1), l1, l2, a1, s1, a2, s2, 0.0, None)
        torch.testing.assert_close(one, two, atol=1e-9, rtol=1e-7)
    student = lambda x, t: sde.distill_target(teacher, x, t.double(), N, schedule=schedule,
                                              objective=objective)[0].to(x.dtype)
    run = lambda fn, steps: sde.sample_general(fn, (256,), steps=steps, sampler="ddim",
                                               schedule=schedule, objective=objective,
                                               generator=torch.Generator().manual_seed(6),
                                               dtype=torch.float64)  # eps at t = 1: x0 / alpha
    torch.testing.assert_close(run(student, N), run(teacher, 2 * N), atol=1e-7, rtol=1e-7)


def test_a_tiny_student_learns_its_teacher():
    """A student (per grid time, v_hat = A x + B: the family the exact target lies in, starting as
    the teacher's own coefficients) trained 300 Adam steps on sde.distill_loss with the closed-form
    teacher: the loss falls at least tenfold, and its 2-step DDIM samples move toward the teacher's
    4-step ones (paired error at least 5 times smaller). Seen failing with a broken target."""
    mu, s, N, schedule = 0.3, 0.5, 2, "cosine"
    teacher = gaussian_oracle(mu, s, schedule)
    grid = torch.tensor([(i + 1) / N for i in range(N)], dtype=torch.float64)
    with torch.no_grad():  # the teacher's own affine coefficients at each grid time
        b0 = torch.stack([teacher(torch.zeros(1), grid[i:i + 1])[0] for i in range(N)])
        a0 = torch.stack([teacher(torch.ones(1), grid[i:i + 1])[0] for i in range(N)]) - b0
    A, B = a0.clone().float().requires_grad_(), b0.clone().float().requires_grad_()
    student = lambda x, t: (A[(t * N).round().long() - 1].view(-1, 1) * x
                            + B[(t * N).round().long() - 1].view(-1, 1))
    opt = torch.optim.Adam([A, B], lr=3e-3)
    g = torch.Generator().manual_seed(7)
    losses = []
    for step in range(300):
        x0 = mu + s * torch.randn(256, 8, generator=g)
        loss, _ = sde.distill_loss(student, teacher, x0, steps=N, schedule=schedule, generator=g)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        losses.append(float(loss.mean()))
    assert sum(losses[-20:]) / 20 < sum(losses[:5]) / 5 / 10, (losses[:5], losses[-20:])
    run = lambda fn, steps: sde.sample_general(fn, (4096,), steps=steps, sampler="ddim",
                                               schedule=schedule,
                                               generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref, before = run(teacher, 2 * N), run(teacher, N)
        after = run(lambda x, t: student(x[:, None], t)[:, 0], N)
    err = lambda x: float((x - ref).abs().mean())
    assert err(after) < err(before) / 5, (err(before), err(after))


def test_few_step_inpainting_holds_the_known_pixels():
    """A student's 2-step DDIM sampling with inpainting returns the known pixels exactly."""
    n = 128
    known, mask = torch.tensor([0.8, 0.0]).expand(n, 2), torch.tensor([True, False]).expand(n, 2)
    x = sde.sample_general(_bivariate(0.9), (n, 2), steps=2, sampler="ddim", known=known,
                           mask=mask, generator=torch.Generator().manual_seed(9))
    assert torch.equal(x[:, 0], known[:, 0]) and x[:, 1].std() > 0.05
