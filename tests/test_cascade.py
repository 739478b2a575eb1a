"""cascade.py: geometry against hand computations, the CDM, checkpoint loading."""
import dataclasses
import shutil

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import cascade
import tiler
import unet
from conftest import oracle_net, small_preset
from operations import checkpoints


def test_stage_sizes_and_zoom():
    paper = cascade.get_preset("paper")
    assert [cascade.stage_size(paper, s) for s in (1, 2, 3)] == [1024, 6400, 41344]
    assert cascade.zoom(paper, 2) == 6.25 and cascade.zoom(paper, 3) == pytest.approx(6.46)
    g = cascade.stage_grid(paper, 3)
    assert (g.overlap, g.stride, g.size) == (128, 896, 41344)
    demo = cascade.get_preset("demo")
    assert [cascade.stage_size(demo, s) for s in (1, 2, 3)] == [256, 704, 2048]
    for p in (paper, demo):
        assert p.level_sizes[-1] == p.patch and all(L % 8 == 0 for L in p.level_sizes)


def _coded_image(h, w):
    """uint8 image whose pixel (y, x) is (y, x, 7): a misplaced crop is visible."""
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([yy, xx, np.full_like(yy, 7)], -1).astype(np.uint8)


@pytest.mark.parametrize("y0,x0", [(0, 0), (0, 96), (96, 0), (96, 96), (48, 48)])
def test_context_crop_hand_computed(y0, x0):
    """Stage-s image 128 px, r = 2, P = 32: the context is the 32 x 32 lower crop centred
    at ((y0 + 16) / 2, (x0 + 16) / 2), padded with background where it leaves the image."""
    lower = _coded_image(64, 64)
    crop = cascade.context_crop(lower, y0, x0, 32, 2.0, background=255)
    cy, cx = (y0 + 16) // 2 - 16, (x0 + 16) // 2 - 16  # exact here: centres are integers
    padded = np.pad(lower, ((32, 32), (32, 32), (0, 0)), constant_values=255)
    np.testing.assert_array_equal(crop, padded[cy + 32:cy + 64, cx + 32:cx + 64])
    if (y0, x0) == (0, 0):
        assert (crop[:8] == 255).all() and (crop[:, :8] == 255).all() and crop[8, 8, 0] == 0


@pytest.mark.parametrize("y0,x0", [(0, 0), (48, 48), (96, 96)])
def test_region_crop_hand_computed(y0, x0):
    """A lower image linear in y and x: the region crop (bilinear at (Y + 0.5)/r - 0.5) is the
    same linear function, exactly, inside; clamped to the edge pixel outside (border)."""
    yy, xx = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    lower = np.stack([10 + 2 * yy, 10 + 3 * xx, np.full_like(yy, 50)], -1).astype(np.uint8)
    reg = cascade.region_crop(lower, y0, x0, 32, 2.0)[0]  # (3, 32, 32)
    u = np.clip((y0 + np.arange(32) + 0.5) / 2 - 0.5, 0, 63)  # source rows
    v = np.clip((x0 + np.arange(32) + 0.5) / 2 - 0.5, 0, 63)
    np.testing.assert_allclose(reg[0].numpy(),
                               np.repeat(((10 + 2 * u) / 127.5 - 1)[:, None], 32, 1), atol=1e-5)
    np.testing.assert_allclose(reg[1].numpy(),
                               np.repeat(((10 + 3 * v) / 127.5 - 1)[None], 32, 0), atol=1e-5)


def test_region_crop_agrees_on_overlaps():
    lower = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    r = 116 / 40
    a = cascade.region_crop(lower, 0, 28, 32, r)  # patches (0, 1) and (0, 2) of a 116 px stage
    b = cascade.region_crop(lower, 0, 56, 32, r)
    assert torch.equal(a[..., 28:], b[..., :4])


def test_lowres_and_level_inputs():
    p = small_preset()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    const = torch.full((1, 3, 32, 32), 0.25)
    torch.testing.assert_close(cascade.make_lowres(cascade.downsample(const, 8), 16),
                               torch.full((1, 3, 16, 16), 0.25))
    for stage in (1, 2):
        for level in range(3):
            cond = cascade.level_inputs(p, stage, level, x, x, x)
            ch = cascade.cond_channels(p, stage, level)
            assert (cond is None and ch == 0) or cond.shape == (2, ch, p.level_sizes[level],
                                                                p.level_sizes[level])


def test_cdm_holds_known_pixels_at_top_level():
    p = small_preset()
    cdm = cascade.CDM(p, 2, [oracle_net()] * 3)
    known = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    mask[:, :, :4], mask[1, :, :, :4] = True, True
    gens = [torch.Generator().manual_seed(k) for k in range(2)]
    out = cdm.sample(gens, known=known, mask=mask, context=known, region=known)
    m = mask.expand_as(known)
    assert torch.equal(out[m], known[m]) and not torch.equal(out[~m], known[~m])


def test_feather_weight_ramp():
    m = torch.zeros(1, 1, 8, 12, dtype=torch.bool)
    m[..., :6] = True  # known columns 0-5, next to the patch border on the left
    w = cascade.feather_weight(m, 3)
    assert torch.equal(w[0, 0, 0], torch.tensor([1, 1, 1, .75, .5, .25, 0, 0, 0, 0, 0, 0]))
    # rows: no fade at the border
    assert torch.equal((w[0, 0] == w[0, 0, :1]).all(0), torch.ones(12, dtype=torch.bool))
    assert torch.equal(cascade.feather_weight(m, 0), m.float())
    m[..., 5:, :] = True  # an L-shaped known region: the corner fades by Chebyshev distance
    w = cascade.feather_weight(m, 1)[0, 0]
    assert w[4, 7] == 0 and w[5, 7] == w[4, 5] == w[5, 5] == 0.5 and w[7, 7] == w[3, 4] == 1


def test_cdm_feather_keeps_known_pixels_away_from_the_new_ones():
    """feather = 4 px at P = 32: known pixels more than 4 px from a new one are exact, the last 4
    fade into the model's own prediction of them."""
    p = small_preset()
    cdm = cascade.CDM(p, 2, [oracle_net()] * 3)
    known = torch.rand(1, 3, 32, 32) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[..., :10] = True
    gen = lambda: [torch.Generator().manual_seed(1)]
    sampling = dataclasses.replace(p.sampling, feather=4)
    out = cdm.sample(gen(), known=known, mask=mask, context=known, region=known, sampling=sampling)
    assert torch.equal(out[..., :6], known[..., :6])
    assert (out[..., 6:10] - known[..., 6:10]).abs().amax() > 1e-3


def _save(path, preset, stage, level, net):
    torch.save(checkpoints.model_payload(preset, stage, level, net.cfg, net.state_dict()), path)


def test_checkpoint_round_trip_and_errors(tmp_path):
    p = small_preset()
    nets = {}
    for level in range(3):
        torch.manual_seed(level)
        nets[level] = unet.build(cascade.unet_config(p, 2, level))
        _save(tmp_path / checkpoints.model_filename(2, level), p, 2, level, nets[level])
    cdm = checkpoints.load_cdm(str(tmp_path), p, 2)
    for level in range(3):
        for a, b in zip(cdm.nets[level].state_dict().values(), nets[level].state_dict().values()):
            assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="stage3_level0.pt: missing model file"):
        checkpoints.load_cdm(str(tmp_path), p, 3)
    with pytest.raises(ValueError, match="trained for preset"):
        checkpoints.load_cdm(str(tmp_path), small_preset(background=250), 2)
    # sampling defaults may change
    checkpoints.load_cdm(str(tmp_path), small_preset(sampling=cascade.Sampling(steps=(9, 9, 9))), 2)
    # and so may the training recipe
    checkpoints.load_cdm(str(tmp_path), small_preset(training=cascade.Training(crop=8)), 2)
    shutil.copy(tmp_path / "stage2_level1.pt", tmp_path / "stage2_level2.pt")
    with pytest.raises(ValueError, match="holds stage 2 level 1, expected stage 2 level 2"):
        checkpoints.load_cdm(str(tmp_path), p, 2)
    (tmp_path / "stage2_level1.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable URCDM model file"):
        checkpoints.load_cdm(str(tmp_path), p, 2)


def test_steps_per_stage_and_level():
    """Sampling.steps: 3 values apply to every stage; 9 give each stage its own (stage 2 =
    4th-6th)."""
    calls = []

    def counting(level):
        net = oracle_net()
        return lambda *a: calls.append(level) or net(*a)

    p = small_preset()
    P = p.patch
    inputs = dict(context=torch.zeros(1, 3, P, P), region=torch.zeros(1, 3, P, P))
    for steps, expect in (((2, 3, 4), [2, 3, 4]), ((9, 9, 9, 1, 2, 3, 9, 9, 9), [1, 2, 3])):
        calls.clear()
        sp = dataclasses.replace(p.sampling, steps=steps)
        cascade.CDM(p, 2,
                    [counting(l) for l in range(3)]).sample([torch.Generator().manual_seed(0)],
                                                            sampling=sp,
                                                                  **inputs)
        assert [calls.count(l) for l in range(3)] == expect
    with pytest.raises(ValueError, match="3 values .* or 9"):
        cascade.Sampling(steps=(1, 2))


def test_lowres_window_equals_the_crop_of_the_whole():
    """make_lowres(x, size, window) = make_lowres(x, size)[window]: bit for bit at power-of-two
    zooms (training's top-level crops), for windows at the borders and inside."""
    x = torch.randn(2, 3, 16, 16)
    full = cascade.make_lowres(x, 64)
    for y, x0, c in ((0, 0, 16), (48, 48, 16), (5, 37, 24), (13, 0, 40), (0, 3, 64)):
        got = cascade.make_lowres(x, 64, (y, x0, c))
        assert torch.equal(got, full[..., y:y + c, x0:x0 + c]), (y, x0, c)


class _HostTransfers(TorchDispatchMode):
    """Counts what reaches the device from the host: ops that take a CPU tensor and give a device
    tensor (copies, CPU operands), and tensors made on the device from Python data."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.n = 0
        for name in ("tensor", "as_tensor"):
            real = getattr(torch, name)

            def made(data, *a, _real=real, **kw):
                out = _real(data, *a, **kw)
                self.n += out.device.type != "cpu" and not isinstance(data, torch.Tensor)
                return out
            monkeypatch.setattr(torch, name, made)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = lambda t: [a for a in tree_leaves(t) if isinstance(a, torch.Tensor)]
        self.n += (any(a.device.type == "cpu" for a in leaves((args, kwargs)))
                   and any(o.device.type != "cpu" for o in leaves(out)))
        return out


def test_sampling_steps_neither_sync_nor_copy_from_the_host(monkeypatch):
    """The CDM on the 'meta' device (tensors without data: reading one on the host, .item(),
    .cpu() or a Python bool of it, raises), with noise from the patches' generators, dynamic
    thresholding, inpainting and a feathered paste: it runs, and the host-to-device transfers
    do not grow with the steps (the step loop adds none; a level's setup may add a few)."""
    p = small_preset()
    nets = [unet.build(cascade.unet_config(p, 3, lvl)).to("meta").eval() for lvl in range(3)]
    cdm = cascade.CDM(p, 3, nets, device="meta")
    P, B = p.patch, 2
    z = torch.zeros(B, 3, P, P, device="meta")
    mask = torch.zeros(B, 1, P, P, dtype=torch.bool, device="meta")
    counts = []
    for steps in (2, 5):
        sp = dataclasses.replace(p.sampling, steps=(steps,) * 3, threshold=0.95, feather=2)
        gens = [tiler.patch_generator(0, 3, 0, j, "meta") for j in range(B)]
        with _HostTransfers(monkeypatch) as h:
            x = cdm.sample(gens, known=z, mask=mask, context=z, region=z, sampling=sp)
        counts.append(h.n)
        monkeypatch.undo()
    assert x.shape == (B, 3, P, P) and x.device.type == "meta"
    assert counts[0] == counts[1]
    # the counter sees the copies it is meant to catch
    with _HostTransfers(monkeypatch) as h:
        torch.as_tensor(0.5, device="meta"), torch.ones(2).to("meta")
        torch.tensor([1.0], device="meta")
    assert h.n == 3


def test_cdm_samples_with_the_authors_unet(tmp_path, monkeypatch):
    """The `paper` U-Net (ImagenUNet, at a tiny width) through a model file and a stage-2 CDM:
    the low-res image it re-concatenates is the first conditioning channels, the output is
    finite, on the known pixels exact, and the same for the same generators."""
    monkeypatch.setitem(unet.CONFIGS, "imagen_tiny", unet.UNetConfig(
        width=16, mults=(1, 2), blocks=1, attn=(False, True), cross_attn=(True, True), heads=2,
        head_dim=8, groups=4, efficient=True, init_residual=True, imagen=True))
    p = small_preset(unets=("imagen_tiny",) * 3, aug_inputs="lowres", region=False,
                     resize="nearest", objectives=("eps", "v", "v"))
    for level in range(3):
        torch.manual_seed(level)
        net = unet.build(cascade.unet_config(p, 2, level))
        for prm in net.parameters():
            torch.nn.init.normal_(prm, std=0.05)
        _save(tmp_path / checkpoints.model_filename(2, level), p, 2, level, net)
    cdm = checkpoints.load_cdm(str(tmp_path), p, 2)
    assert all(isinstance(n, unet.ImagenUNet) for n in cdm.nets)
    context = torch.rand(1, 3, 32, 32) * 2 - 1
    known, mask = context.clone(), torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[..., :4] = True
    gen = lambda: [torch.Generator().manual_seed(2)]
    out = cdm.sample(gen(), known=known, mask=mask, context=context)
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    assert torch.equal(out[..., :4], known[..., :4])
    assert torch.equal(out, cdm.sample(gen(), known=known, mask=mask, context=context))
