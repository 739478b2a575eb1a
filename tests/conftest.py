"""Shared test helpers: the project root on sys.path, closed-form denoisers."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sde  # noqa: E402


def gaussian_oracle(mu, s, schedule="cosine"):
    """Optimal v-predictor for data x0 ~ N(mu, s^2) per pixel (DESIGN §3):
    x0_hat = mu + alpha s^2 (x_t - alpha mu) / (alpha^2 s^2 + sigma^2), v_hat = (alpha x_t - x0_hat) / sigma."""
    def model_fn(x, t):
        alpha, sigma = sde.alpha_sigma(t.double(), schedule)
        alpha = alpha.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
        sigma = sigma.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
        x0_hat = mu + alpha * s * s * (x - alpha * mu) / (alpha ** 2 * s * s + sigma ** 2)
        return (alpha * x - x0_hat) / sigma
    return model_fn


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield
