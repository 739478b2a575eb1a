"""Shared test helpers: the project root on sys.path, closed-form denoisers."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sde  # noqa: E402
from operations import checkpoints  # noqa: E402


def gaussian_oracle(mu, s, schedule="cosine"):
    """Optimal v-predictor for data x0 ~ N(mu, s^2) per pixel (docs/design.md, "Diffusion"):
    x0_hat = mu + alpha s^2 (x_t - alpha mu) / (alpha^2 s^2 + sigma^2), v_hat = (alpha x_t - x0_hat)
    / sigma."""
    def model_fn(x, t):
        alpha, sigma = sde.alpha_sigma(t.double(), schedule)
        alpha = alpha.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
        sigma = sigma.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
        x0_hat = mu + alpha * s * s * (x - alpha * mu) / (alpha ** 2 * s * s + sigma ** 2)
        return (alpha * x - x0_hat) / sigma
    return model_fn


def torchrun_failure(stderr):
    """What a failed torchrun printed that says why: its ranks' error lines (torchrun's own
    summary, at the end, names only the signal), then the tail."""
    why = [line for line in stderr.splitlines()
           if any(k in line for k in ("Error", "error:", "terminate", "what()", "Abort", "Signal"))]
    return "\n".join(why[:30]) + "\n...\n" + stderr[-1500:]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


def oracle_net(mu=0.0, s=0.5, cond_weight=0.05):
    """A closed-form stand-in for a U-Net, net(x_t, lam, cond, aug_lam) -> v_hat: the exact
    denoiser of x0 ~ N(mu, s^2), shifted by the conditioning's channel mean so that crops and
    their alignment change the output. Batch-invariant (elementwise), unlike CPU GEMMs."""
    def net(x, lam, cond=None, aug_lam=None):
        alpha, sigma = sde.alpha_sigma_from_lam(lam.double())
        alpha, sigma = (v.view(-1, 1, 1, 1).float() for v in (alpha, sigma))
        m = mu if cond is None else mu + cond_weight * cond.mean(1, keepdim=True)
        x0_hat = m + alpha * s * s * (x - alpha * m) / (alpha ** 2 * s * s + sigma ** 2)
        return (alpha * x - x0_hat) / sigma
    return net


def small_preset(**kw):
    """The 'tiny' preset (P = 32, overlap 4, stages 32 / 88 / 116, levels 8 -> 16 -> 32: the paper's
    structure), with fields replaced by kw."""
    import dataclasses

    import cascade
    return dataclasses.replace(cascade.get_preset("tiny"), **kw)


def save_tiny_models(d, mpp=None, std=0.03):
    """Nine random-weight U-Nets of the 'tiny' preset in directory d, saved as train.py saves
    them."""
    import cascade
    import unet
    p = cascade.get_preset("tiny")
    for s in (1, 2, 3):
        for lvl in range(3):
            torch.manual_seed(10 * s + lvl)
            net = unet.build(cascade.unet_config(p, s, lvl))
            for prm in net.parameters():
                torch.nn.init.normal_(prm, std=std)
            torch.save(checkpoints.model_payload(p, s, lvl, net.cfg, net.state_dict(), mpp=mpp),
                       os.path.join(d, checkpoints.model_filename(s, lvl)))
    return str(d)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("ckpt"))


SLIDE = os.path.join(ROOT, "tests", "data", "cmu_small_region.svs")  # the bundled CC0 slide


def cli(*argv, cwd=None, timeout=300, threads="1"):
    """A command run as a user runs it (python ARGV), one thread: its CompletedProcess."""
    import subprocess
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=threads)
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=cwd)


def sample_cli(*argv, **kw):
    return cli(os.path.join(ROOT, "sample.py"), *argv, **kw)


def one_line_error(res, *needles):
    """Whether a command ended with one line 'error: ...' holding every needle, no traceback."""
    lines = res.stderr.strip().splitlines()
    return (res.returncode != 0 and "Traceback" not in res.stderr and bool(lines)
            and lines[-1].startswith("error: ") and all(n in lines[-1] for n in needles))


def tiny_argv(out, ckpt, *extra):
    """sample.py's flags for a tiny run of the models in `ckpt` into `out`."""
    return ["--preset", "tiny", "--ckpt", ckpt, "--out", str(out), "--compression", "zlib",
            "--device", "cpu", "--batch", "2", *extra]


def demo_windows(out, *extra):
    """A demo windows run with the stand-in models (cheap): checkerboard, batch 1."""
    return sample_cli("--preset", "demo", "--dry-run", "--order", "checkerboard", "--out", out,
                      *extra)
