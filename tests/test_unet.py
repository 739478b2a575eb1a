"""unet.py: shapes, init, gradient flow, paper sizes, and that it learns."""
import pytest
import torch

import sde
import unet
from operations import costs


@pytest.mark.parametrize("name", sorted(unet.CONFIGS))
def test_config_output_shape_and_zero_init(name):
    # Each named config's structure (levels, blocks, attention) at a tiny width.
    cfg = unet.get_config(name, width=8, head_dim=8, groups=4, cond_ch=6, aug_emb=True)
    model = unet.build(cfg).to(memory_format=torch.channels_last)
    # any multiple of 2^(levels(-1)), not only 2^k
    size = 2 ** (len(cfg.mults) - (0 if cfg.efficient else 1)) * 3
    x = torch.randn(2, 3, size, size).to(memory_format=torch.channels_last)
    out = model(x, torch.zeros(2), torch.randn(2, 6, size, size), torch.zeros(2))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output layer


def test_bad_input_size_is_rejected():
    model = unet.build(unet.get_config("tiny"))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 3, 15, 15), torch.zeros(1))


@pytest.mark.parametrize("layout",
                         [{}, {"efficient": True},
                          {"imagen": True, "cross_attn": (True, True)},
                          {"imagen": True, "efficient": True, "cross_attn": (False, True),
                           "init_residual": True}])
def test_gradients_reach_every_parameter(layout):
    model = unet.build(unet.get_config("tiny", cond_ch=3, aug_emb=True, **layout))
    for p in model.parameters():  # leave the zero init, which blocks gradients on purpose
        if torch.count_nonzero(p) == 0:
            torch.nn.init.normal_(p, std=0.02)
    out = model(torch.randn(2, 3, 16, 16), torch.randn(2),
                torch.randn(2, 3, 16, 16), torch.randn(2))
    out.square().mean().backward()
    dead = [n for n, p in model.named_parameters()
            if p.grad is None or torch.count_nonzero(p.grad) == 0]

    assert not dead


@pytest.mark.parametrize("name,target",
                         [("paper64", 412.9e6), ("paper256", 300.5e6), ("paper1024", 690.3e6),
                          ("plus64", 367.9e6), ("plus256", 253.6e6), ("plus1024", 597.6e6)])
def test_paper_parameter_counts(name, target):
    """The paper's models (the authors' 412.9 / 300.5 / 690.3 M) and paper_plus's leaner ones
    within 1 %, counted on the meta device."""
    lowres = "64" not in name
    cfg = unet.get_config(name, cond_ch=6 if lowres else 3, aug_emb=lowres)
    assert abs(costs.count_params(cfg) / target - 1) < 0.01


@pytest.mark.slow
def test_tiny_unet_learns():
    """~200 Adam steps on 8 fixed 16x16 images: the v-loss falls clearly."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    data = torch.stack([torch.stack([torch.sin(3 * xx + k),
                                     torch.cos(2 * yy - k), xx * yy]) for k in range(8)])
    model = unet.build(unet.get_config("tiny"))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    fn = lambda x, t: model(x, sde.log_snr(t).float())
    losses = []
    for step in range(200):
        loss = sde.loss_fn(fn, data, generator=g)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)


def test_group_norm_in_fp32_under_any_autocast():
    """Inside the U-Net GroupNorm runs in float32 and returns float32 under CPU autocast too (as
    CUDA's autocast does): the same values as an fp32 GroupNorm of the same input."""
    gn = unet.norm(32, 8)
    torch.nn.init.normal_(gn.weight)
    ref = torch.nn.GroupNorm(8, 32)
    ref.load_state_dict(gn.state_dict())
    x = torch.randn(2, 32, 8, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gn(x)
        plain = ref(x)
    assert out.dtype == torch.float32 and plain.dtype == torch.bfloat16  # CPU autocast alone: bf16
    assert torch.equal(out, ref(x.float()))


@pytest.mark.parametrize("name", ["paper64", "paper256", "paper1024"])
def test_imagen_unet_computes_imagen_pytorchs_unet(name):
    """ImagenUNet is imagen-pytorch 1.26.0's Unet, checked without it installed: tiny versions of
    the authors' three layouts (bench_authors.FIXTURE: their levels, blocks, attention, cross-
    attention, efficient layout, init residual at width 8), weights and inputs made by arithmetic
    (bench_authors.formula_weights, formula_inputs), against imagen-pytorch's outputs stored in
    tests/data/imagen_unets.pt, made once with
        pip install --no-deps --target /tmp/imagen imagen-pytorch==1.26.0 einops beartype
        python tests/bench_authors.py /tmp/imagen --fixture tests/data/imagen_unets.pt
    (ours then differed by at most 2.7e-6, outputs of scale 1.9-3.4)."""
    import os

    import bench_authors
    from conftest import ROOT
    fixture = torch.load(os.path.join(ROOT, "tests", "data", "imagen_unets.pt"),
                         weights_only=True)[name]
    net = unet.build(unet.UNetConfig(**fixture["config"])).eval()
    bench_authors.formula_weights(net)
    inputs, _ = bench_authors.formula_inputs(bench_authors.FIXTURE_SIZE, net.cfg.aug_emb)
    with torch.no_grad():
        out = net(**inputs)
    want = fixture["output"]
    assert float((out - want).abs().max()) <= 1e-5 * float(want.abs().max())
