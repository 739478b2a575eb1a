"""The `paper` preset is the authors' recipe: each setting against its source, and the
mechanisms behind the settings (augmentation level, DDIM, thresholding, min-SNR, white fill)."""
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import cascade
import data
import sample
import sde
import tiler
import train
import unet
from conftest import ROOT, gaussian_oracle, oracle_net, small_preset
from operations import checkpoints, settings

SLIDE = os.path.join(ROOT, "tests", "data", "cmu_small_region.svs")

# (field, the authors' value, source). [AUTH] = the authors' training script (their Imagen /
# ElucidatedImagen set-up on lucidrains' imagen-pytorch 1.25/1.26); [IP] = an imagen-pytorch
# default their script leaves unchanged; [PAPER] = the MICCAI paper.
AUTHORS = [
    ("patch", 1024, "[PAPER] Sec. 2: every CDM generates 64 -> 256 -> 1024"),
    ("n_patches", (1, 7, 46), "[PAPER] Sec. 2: 1024, 6400, 41344 px stages, 12.5 % overlap"),
    ("level_sizes", (64, 256, 1024), "[PAPER] Sec. 2"),
    ("unets", ("paper64", "paper256", "paper1024"),
     "[AUTH] their three Unet / Unet1024 sizes (unet.CONFIGS; tests/bench_authors.py)"),
    ("schedules", ("cosine", "cosine", "linear"), "[AUTH] noise_schedules"),
    ("background", (242, 243, 242), "[AUTH] the dataset pads crops beyond the image with it"),
    ("resize", "nearest", "[IP] resize_image_to: F.interpolate(mode='nearest') for targets, "
     "the lowres input (down and up) and the context"),
    ("sampling.steps", (1024, 256, 256), "[AUTH] timesteps per unet"),
    ("sampling.sampler", "ancestral", "[IP] Imagen's p_sample loop: the ancestral step"),
    ("sampling.order", "packed",
     "[PAPER] patches one after another (raster); packed gives raster's slide (tiler.py)"),
    ("objectives", ("eps", "v", "v"),
     "[AUTH] pred_objectives: eps for the 64 px base U-Net, v above"),
    ("aug_schedule", "linear", "[IP] lowres_noise_schedule = 'linear'"),
    ("aug_inputs", "lowres", "[IP] only lowres_cond_img is noised; cond_images never are"),
    ("region", False,
     "[AUTH] the region input exists only as an option left off; [PAPER] names context only"),
    ("training.aug_train", (0.0, 1.0), "[IP] lowres noise level ~ U(0, 1) in training"),
    ("training.aug_per_batch", True, "[IP] one random lowres noise time per batch"),
    ("training.min_snr_gamma", 5.0, "[IP] min_snr_loss_weight = True, min_snr_gamma = 5"),
    ("training.crop", 256, "[AUTH] random_crop_sizes: the 1024 px U-Net trains on 256 px crops"),
    ("training.area_choice", "centre",
     "[PAPER] Sec. 3: a 40000 x 40000 centre crop of each slide"),
    ("training.positions", "grid",
     "[AUTH] patient_dataset.py: magnification 1-2 patches from a grid of 1024 px tissue blocks "
     "over the whole slide (data.tissue_grid), each shifted by 0 or 512 px in x and y"),
    ("training.crop_context", "whole",
     "[IP] random_crop_sizes crops x and lowres_cond_img together; the Unet resizes cond_images "
     "whole onto the crop (resize_image_to)"),
    ("training.ema_warmup", "ema-pytorch",
     "[IP] the trainer's EMA keeps ema-pytorch's defaults: beta 0.9999, a copy until step 100, "
     "then every 10 steps, warm-up 1 - (1 + n)^(-2/3)"),
    ("sampling.aug_level", 0.2, "[IP] lowres_sample_noise_level = 0.2"),
    ("sampling.threshold", 0.95, "[IP] dynamic_thresholding = True, percentile 0.95"),
    ("sampling.edge_margin", 0, "[PAPER] the whole overlap is kept constant"),
    ("sampling.feather", 0, "[PAPER] known pixels are pasted as they are"),
    ("sampling.fill_white", (3,),
     "[PAPER] 'high-magnification patches ... mostly white are ignored'"),
    ("context_range", (0.0, 1.0),
     "[IP] imagen normalises the image and lowres_cond_img to [-1, 1], never cond_images: the "
     "context stays the dataset's [0, 1]"),
    ("training.fields", (40000, 6500, 1024),
     "[AUTH] patient_dataset.py: a 40000 px region for stage 1, 6500 px fields for stage 2, "
     "1024 px level-0 fields (the grid's blocks) for stage 3"),
    ("training.holdout", 0.025, "[AUTH] the last 2.5 % of the examples are for validation"),
]


def test_the_grid_keeps_the_blocks_the_authors_keep():
    """[AUTH] patient_dataset.py keeps a block whose mean colour has hue > 0.5, saturation > 0.1,
    value < 0.9: purple and pink H&E blocks are kept; glass, brown, green, a bright pink above the
    value bound and a greyish purple below the saturation bound are not (hues worked by hand).
    Seen failing with the hue bound at 0.3 and with saturation taken as delta / 255."""
    kept = [(200, 100, 180), (150, 60, 160), (210, 120, 200)]   # hue 0.87, 0.80, 0.86
    dropped = [(240, 240, 240), (180, 140, 60), (60, 180, 80),  # glass, hue 0.11, hue 0.36
               (250, 150, 240), (200, 190, 198)]                # value 0.98; saturation 0.05
    got = data.grid_tissue(np.array([kept + dropped], np.uint8))[0]
    assert got.tolist() == [True] * len(kept) + [False] * len(dropped)


@pytest.mark.parametrize("name", ["paper64", "paper256", "paper1024"])
def test_paper_unets_are_the_authors_settings(name):
    """unet.CONFIGS against the authors' Unet arguments (tests/bench_authors.py: their script)
    and imagen-pytorch's defaults they keep (GroupNorm 8, 8 heads of 64, middle attention)."""
    import bench_authors
    kw, cfg = bench_authors.AUTHORS_UNETS[name][2], unet.CONFIGS[name]
    blocks = kw["num_resnet_blocks"]
    n = len(kw["dim_mults"])
    as_levels = lambda v: tuple(v) if isinstance(v, tuple) else (v,) * n
    assert cfg.imagen and (cfg.width, cfg.mults) == (kw["dim"], kw["dim_mults"])
    assert cfg.per_level_blocks() == as_levels(blocks)
    assert cfg.attn == as_levels(kw["layer_attns"])
    assert cfg.cross_attn == as_levels(kw["layer_cross_attns"])
    assert cfg.efficient == kw.get("memory_efficient", False)
    assert cfg.init_residual == kw.get("init_conv_to_final_conv_residual", False)
    assert (cfg.groups, cfg.heads, cfg.head_dim) == (8, 8, 64)


def _get(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("field,value,source", AUTHORS, ids=[a[0] for a in AUTHORS])
def test_paper_preset_is_the_authors_recipe(field, value, source):
    assert _get(cascade.get_preset("paper"), field) == value, source


def test_paper_augmentation_level_at_sampling():
    """t_aug = 0.2 on imagen's linear schedule: alpha 0.819, sigma 0.574 (SNR 2.0); our cosine
    schedule at 0.2 would give alpha 0.948, sigma 0.318."""
    p = cascade.get_preset("paper")
    cond = torch.zeros(1, 3, 4, 4)
    _, aug_lam = cascade.augment(p, 3, 1, torch.cat([cond, cond + 1], dim=1), p.sampling.aug_level)
    alpha, sigma = sde.alpha_sigma_from_lam(aug_lam.double())
    assert float(alpha) == pytest.approx(0.819, abs=1e-3)
    assert float(sigma) == pytest.approx(0.574, abs=1e-3)
    assert float(torch.exp(aug_lam)) == pytest.approx(2.0, abs=0.05)


def test_paper_augments_only_the_lowres_input():
    p = cascade.get_preset("paper")
    lowres, context = torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.5)
    noised, aug_lam = cascade.augment(p, 3, 1, torch.cat([lowres, context], 1), 0.5,
                                      torch.Generator().manual_seed(0))
    assert not torch.equal(noised[:, :3], lowres) and torch.equal(noised[:, 3:], context)
    # level 0: context only, nothing noised
    assert cascade.augment(p, 3, 0, context, 0.5)[1] is None
    assert not cascade.unet_config(p, 3, 0).aug_emb and cascade.unet_config(p, 3, 1).aug_emb
    # no region
    assert cascade.cond_channels(p, 3, 1) == 6 and cascade.cond_channels(small_preset(), 3, 1) == 9


def test_ddim_eta0_is_deterministic_and_differs_from_ancestral():
    fn = gaussian_oracle(0.2, 0.7)
    run = lambda sampler, g: sde.sample_general(fn, (256,), steps=10, sampler=sampler, eta=0.0,
                                                generator=g)
    g = torch.Generator().manual_seed(1)
    a = run("ddim", g)
    # The initial noise x_T is the only draw: the generator moved on by exactly one (256,) draw.
    ref = torch.Generator().manual_seed(1)
    torch.randn(256, generator=ref)
    assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=ref))
    assert torch.equal(a, run("ddim", torch.Generator().manual_seed(1)))
    assert (a - run("ancestral", torch.Generator().manual_seed(1))).abs().mean() > 0.05


def test_dynamic_thresholding_as_imagen():
    """Per sample: q = max(quantile(|x0_hat|, p), 1); clip to [-q, q], divide by q."""
    x0_hat = torch.stack([torch.linspace(-3, 3, 101),
                          torch.linspace(-0.5, 0.5, 101)]).view(2, 1, 101)
    out = sde.dynamic_threshold(x0_hat, 0.95)
    q = float(torch.quantile(torch.linspace(-3, 3, 101).abs(), 0.95))
    torch.testing.assert_close(out[0], x0_hat[0].clamp(-q, q) / q)
    torch.testing.assert_close(out[1], x0_hat[1])  # within [-1, 1]: q = 1, unchanged
    assert float(out.abs().max()) <= 1.0


def test_min_snr_weights():
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    snr = torch.exp(sde.log_snr(t, "cosine"))
    torch.testing.assert_close(sde.min_snr_weight(t, "cosine", 5.0),
                               torch.clamp(snr, max=5.0) / (snr + 1))
    torch.testing.assert_close(sde.min_snr_weight(t, "cosine", 5.0, "eps"),
                               torch.clamp(snr, max=5.0) / snr)


def test_eps_objective_samples_the_gaussian():
    """An exact eps-predictor (eps_hat = (x_t - alpha x0_hat) / sigma) samples N(mu, s^2) like v."""
    mu, s = 0.3, 0.5
    v_fn = gaussian_oracle(mu, s)

    def eps_fn(x, t):
        alpha, sigma = (a.view(-1).to(x.dtype) for a in sde.alpha_sigma(t.double()))
        return sde.eps_from_v(x, v_fn(x, t), alpha, sigma)
    x = sde.sample(eps_fn, (1 << 14,), steps=200, objective="eps",
                   generator=torch.Generator().manual_seed(0))
    assert abs(float(x.mean()) - mu) < 0.02 and abs(float(x.std()) - s) < 0.02


@pytest.mark.parametrize("name", ["paper", "paper_plus"])
def test_white_fill_through_the_sampling_code(name):
    """A stage below of pure glass: with sample.py's own rule (data.white_test, what
    sample_slide and generate call) `paper` fills its patches at stage 3 only [PAPER], paper_plus
    at stages 2 and 3; a filled patch is the region, not a sample."""
    p = cascade.get_preset(name)
    glass = tiler.Lower(np.full((64, 64, 3), 255, np.uint8), 2.0)
    grid = cascade.Grid(32, 2)
    filled = {}
    for stage in (2, 3):
        white = data.white_test(p.sampling, stage, data.MIN_TISSUE)
        inputs = tiler.batch_inputs(grid, tiler.MemoryCanvas(grid.size), [(0, 0)],
                                    order="raster", lower=glass, white=white)
        never = lambda *a, **k: pytest.fail("a mostly-white patch was generated")
        zeros = lambda g, **k: torch.zeros(len(g), 3, 32, 32)
        sample_fn = never if inputs.white[0] else zeros
        (_, pixels, filled[stage]), = tiler.run_batch(sample_fn, inputs, stage=stage, seed=0)
        assert (pixels == 255).all() == filled[stage]  # the fill is the glass below
    assert filled == {2: 2 in p.sampling.fill_white, 3: True}
    assert (name == "paper") == (p.sampling.fill_white == (3,))


def test_eta_and_threshold_reach_the_sampler_from_the_command_line(tmp_path, tiny_ckpt,
                                                                   monkeypatch):
    """Real (tiny) models: every sampler call of a run gets the flags' sampler, eta and threshold
    (a stand-in model would ignore them); a sampler other than the paper's runs sample_general."""
    calls, real = [], sde.sample_general

    def spy(fn, shape, **kw):
        calls.append((kw["sampler"], kw["eta"], kw["threshold"]))
        return real(fn, shape, **kw)
    monkeypatch.setattr(sde, "sample_general", spy)
    sample.main(["--preset", "tiny", "--ckpt", tiny_ckpt, "--out", str(tmp_path / "s.tif"),
                 "--device", "cpu", "--stages", "2", "--sampler", "ddim", "--eta", "0.5",
                 "--threshold", "0.9", "--compression", "zlib"])
    assert len(calls) >= 3 * 2 and set(calls) == {("ddim", 0.5, 0.9)}


def test_thresholding_acts_on_x0_hat():
    """A model whose x0_hat is 3 everywhere: thresholded (p = 0.95) the sample is 1, not 3 (no
    clamp inside sde.sample hides it; CDM.sample clamps only after)."""
    def predicts_3(x, t):  # v such that x0_hat = alpha x_t - sigma v = 3
        alpha, sigma = (a.view(-1, 1).float() for a in sde.alpha_sigma(t.double()))
        return (alpha * x - 3) / sigma
    run = lambda th: sde.sample(predicts_3, (2, 16), steps=5, threshold=th,
                                generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(run(None), torch.full((2, 16), 3.0))
    torch.testing.assert_close(run(0.95), torch.ones(2, 16))


def _trainer(tmp_path, stage, level, **training):
    """A Trainer at tiny sizes with everything else of `paper` (objectives, augmentation, its
    training fields), `training` overriding some."""
    tiny, paper = cascade.get_preset("tiny"), cascade.get_preset("paper")
    same = {k: getattr(paper, k) for k in ("objectives", "aug_schedule", "aug_inputs", "region")}
    p = dataclasses.replace(tiny, **same, training=dataclasses.replace(
        paper.training, crop=tiny.training.crop, **training))
    args = train.parse_args(["--preset", "tiny", "--stage", str(stage), "--level", str(level),
                             "--data", SLIDE, "--out", str(tmp_path / "ck")])
    cfg = train.Config(**settings.train_fields(args, torch.device("cpu")))
    t = train.Trainer(cfg, p, stage, level, 0, 1, False, torch.device("cpu"))
    L = p.level_sizes[level]
    batch = {"x0": torch.rand(4, 3, L, L) * 2 - 1,
             "cond": torch.zeros(4, cascade.cond_channels(p, stage, level), L, L)}
    return t, batch


def _ab(lam):
    a2 = torch.sigmoid(lam.double()).view(-1, 1, 1, 1)
    return a2.sqrt().float(), (1 - a2).sqrt().float()


def test_trainer_targets_eps_at_the_eps_level_with_min_snr(tmp_path):
    """Trainer.losses at the base level (eps): a network that returns the true eps has zero loss,
    one that returns 0 has loss mean(eps^2) x min(SNR, 5) / SNR (min-SNR on eps)."""
    t, batch = _trainer(tmp_path, 1, 0, min_snr_gamma=5.0)
    x0, seen = batch["x0"], {}

    def true_eps(x_t, lam, cond=None, aug_lam=None):
        alpha, sigma = _ab(lam)
        seen["eps"] = (x_t - alpha * x0) / sigma
        return seen["eps"]
    t.net = true_eps
    losses, _ = t.losses(batch, torch.Generator().manual_seed(0))
    assert float(losses.max()) < 1e-8
    t.net = lambda x_t, lam, *a: (true_eps(x_t, lam), torch.zeros_like(x_t))[1]
    losses, times = t.losses(batch, torch.Generator().manual_seed(1))
    want = (seen["eps"] ** 2).flatten(1).mean(1) * sde.min_snr_weight(times, t.schedule, 5.0,
                                                                      "eps").float()
    torch.testing.assert_close(losses, want, rtol=1e-4, atol=1e-6)


def test_trainer_draws_one_t_aug_a_batch_from_u01(tmp_path):
    """Stage 2 level 1 (the lowres input is augmented): one aug level per batch, over U(0, 1)
    of the linear schedule (half of the draws above t_aug = 0.5)."""
    t, batch = _trainer(tmp_path, 2, 1)
    levels = []
    t.net = lambda x_t, lam, cond, aug_lam: (levels.append(aug_lam.clone()), x_t)[1]
    for k in range(200):
        t.losses(batch, torch.Generator().manual_seed(k))
    assert all(torch.equal(a, a[:1].expand_as(a)) for a in levels)  # one per batch
    half = float(sde.log_snr(torch.tensor(0.5), "linear"))
    above = sum(float(a[0]) < half for a in levels) / len(levels)  # lam decreases in t
    assert 0.4 < above < 0.6
    assert min(float(a[0]) for a in levels) < float(sde.log_snr(torch.tensor(0.9), "linear"))


@pytest.mark.slow
def test_paper_dry_run_first_two_stages(tmp_path):
    """The paper preset end to end with the stand-in models (stages 1-2: 6400 px, 49 patches)."""
    out = tmp_path / "paper.tif"
    cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--preset", "paper", "--dry-run",
           "--out", str(out),
           "--stages", "2", "--batch", "16", "--compression", "zlib"]
    res = subprocess.run(cmd, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    with tifffile.TiffFile(out) as tif:
        assert tif.series[0].levels[0].shape[:2] == (6400, 6400)


@pytest.mark.slow
def test_train_builds_all_nine_paper_models(tmp_path, monkeypatch):
    """train.py --preset paper: the nine models of the authors' recipe (eps base level, min-SNR,
    per-batch linear augmentation of the lowres input only), at stand-in widths."""
    for name in ("paper64", "paper256", "paper1024"):
        small = unet.get_config(name, width=8, head_dim=8, heads=2, groups=4)
        monkeypatch.setitem(unet.CONFIGS, name,
                            dataclasses.replace(small, mults=small.mults[:2], attn=small.attn[:2],
                                                cross_attn=small.cross_attn[:2], blocks=1))
    train.main(["--preset", "paper", "--stage", "all", "--level", "all", "--data", SLIDE, "--out",
                str(tmp_path / "ck"),
                "--cache", str(tmp_path / "cache"), "--batch", "1", "--max-steps", "1", "--keep",
                "0",
                "--area-size", "2048", "--crop", "64"])
    p = cascade.get_preset("paper")
    for s in (1, 2, 3):
        cdm = checkpoints.load_cdm(str(tmp_path / "ck"), p, s)
        want = [cascade.cond_channels(p, s, lvl) for lvl in range(3)]
        assert [n.cfg.cond_ch for n in cdm.nets] == want

    ck = torch.load(tmp_path / "ck" / "stage1_level0.pt", weights_only=True)
    assert ck["preset"]["objectives"][0] == "eps"
    assert ck["preset"]["training"]["min_snr_gamma"] == 5.0
    assert ck["mpp"] == pytest.approx(0.499 * 2048 / 41344, rel=1e-3)


def test_cdm_with_eps_level_runs_with_thresholding():
    p = small_preset(objectives=("eps", "v", "v"),
                     sampling=dataclasses.replace(small_preset().sampling,
                                                                                   threshold=0.95))
    out = cascade.CDM(p, 1, [oracle_net()] * 3).sample([torch.Generator().manual_seed(0)])
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_paper_resizes_like_imagen():
    """'nearest' (the paper preset's resize): the lowres input of level 1 is level 0's image
    picked every 4th px and repeated, the context picked every 2nd px; no averaging anywhere."""
    p = small_preset(resize="nearest", region=False)
    target = torch.rand(1, 3, 32, 32)
    context = torch.rand(1, 3, 32, 32)
    cond = cascade.level_inputs(p, 2, 1, target, context)  # level 1: 16 px, below it 8 px
    lowres = target[..., ::4, ::4].repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert torch.equal(cond[:, :3], lowres) and torch.equal(cond[:, 3:], context[..., ::2, ::2])
    known = torch.rand(1, 3, 32, 32)
    assert torch.equal(cascade.downsample(known, 8, p.resize), known[..., ::4, ::4])


def test_the_context_reaches_the_unet_in_the_presets_range(tmp_path):
    """`paper`'s context in imagen's [0, 1], the others' in [-1, 1], from the one place both
    training and sampling build inputs (cascade.level_inputs): a dataset item's context channels
    are (those of the same item in [-1, 1] + 1) / 2, and the CDM's too."""
    imagen = small_preset(region=False, context_range=(0.0, 1.0), aug_inputs="lowres")
    ours = small_preset(region=False, aug_inputs="lowres")
    items = [data.StageLevelDataset([SLIDE], p, 3, 1, cache_dir=str(tmp_path))[5]
             for p in (imagen, ours)]
    assert torch.equal(items[0]["cond"][3:], (items[1]["cond"][3:] + 1) / 2)
    assert torch.equal(items[0]["cond"][:3], items[1]["cond"][:3])  # the low-res image: [-1, 1]
    assert items[0]["cond"][3:].min() >= 0 and items[1]["cond"][3:].min() < 0
    ctx = torch.linspace(-1, 1, 3 * 8 * 8).view(1, 3, 8, 8)
    seen = []
    net = lambda x, lam, cond, aug: (seen.append(cond), torch.zeros_like(x))[1]
    cascade.CDM(imagen, 3, [net] * 3).sample([torch.Generator().manual_seed(0)],
                                             context=cascade.downsample(ctx, 32))
    assert seen[0].min() >= 0 and torch.allclose(seen[0], (cascade.downsample(ctx, 8) + 1) / 2)


@pytest.mark.parametrize("background", [(242, 243, 242), 255])
def test_a_slide_smaller_than_its_area_is_padded_with_the_presets_colour(tmp_path, background):
    """The stage images (training's stage 1, sampling's --from) of a slide smaller than its area:
    padded with the preset's colour. They were padded with white whatever the preset."""
    from PIL import Image
    slide = str(tmp_path / "small.png")
    Image.new("RGB", (60, 50), (200, 90, 170)).save(slide)
    p = small_preset(background=background)
    with pytest.warns(UserWarning, match="smaller than the 116 px area"):
        cache = data.slide_cache(slide, p, cache_dir=str(tmp_path / "c"))
    want = np.array(background if isinstance(background, tuple) else (background,) * 3)
    for s in (1, 2):
        img = np.asarray(cache[f"stage{s}"])
        for corner in (img[0, 0], img[-1, -1], img[0, -1], img[-1, 0]):
            assert np.array_equal(corner, want), (s, corner)
        assert (img == (200, 90, 170)).all(-1).any()  # the slide itself, in the middle


def test_grid_fields_are_the_presets(tmp_path):
    """Training.fields (the authors' 40000 / 6500 / 1024 level-0 px): a stage-2 target at grid
    positions is the slide's field of fields[1] px from a block corner (or half a block on),
    resized to P; its context the window of the slide at stage-1 scale (fields[0] / N1 level-0
    px a px: the cached overview) around its centre."""
    from test_data import grid_slide
    path = str(tmp_path / "grid.svs")
    img, corners = grid_slide(path)
    p = small_preset(region=False)
    p = dataclasses.replace(p, training=dataclasses.replace(
        p.training, positions="grid", fields=(100, 40, 32), holdout=0.0, crop=32))
    ds2 = data.StageLevelDataset([path], p, 2, 2, cache_dir=str(tmp_path), augment=False)
    u8 = lambda t: ((t + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with data.open_slide(path) as slide:
        slide.background = p.background
        fields = {(cx + sx, cy + sy): slide.read_region(cx + sx, cy + sy, 32, 32, 40 / 32)
                  for cx, cy in corners for sx in (0, 16) for sy in (0, 16)}
        for idx in range(8):
            item = ds2[idx]
            (x, y), = [xy for xy, f in fields.items() if np.array_equal(u8(item["x0"]), f)]
            cx, cy, ds1 = x + 20, y + 20, 100 / 32  # the centre; stage-1 px in level-0 px
            overview = data.slide_cache(path, p, cache_dir=str(tmp_path))["overview"]
            assert overview.shape[:2] == (round(192 / ds1), round(256 / ds1))
            context = cascade.window(overview, round(cy / ds1 - 16), round(cx / ds1 - 16), 32,
                                     32, p.background)
            assert np.array_equal(u8(item["cond"][3:6]), context)


def test_held_out_examples_are_never_trained_on(tmp_path):
    """Training.holdout [the authors' last 2.5 %]: at grid positions the last blocks, else the
    last slides, drawn only by held_out(); none where the share rounds to 0 (one slide)."""
    from test_data import grid_slide
    path = str(tmp_path / "grid.svs")
    grid_slide(path)
    p = small_preset(region=False)
    p = dataclasses.replace(p, training=dataclasses.replace(p.training, positions="grid",
                                                            holdout=0.34))
    ds = data.StageLevelDataset([path], p, 3, 0, cache_dir=str(tmp_path), augment=False)
    assert (ds.n_val, list(ds.examples), list(ds.held_out().examples)) == (1, [0, 1], [2])
    slides = []
    for k in range(3):
        os.symlink(SLIDE, tmp_path / f"s{k}.svs")
        slides.append(str(tmp_path / f"s{k}.svs"))
    p = small_preset(training=dataclasses.replace(small_preset().training, holdout=0.34))
    ds = data.StageLevelDataset(slides, p, 1, 0, cache_dir=str(tmp_path))
    assert list(ds.examples) == [0, 1] and list(ds.held_out().examples) == [2]
    assert data.StageLevelDataset([SLIDE], p, 1, 0, cache_dir=str(tmp_path)).held_out() is None


def test_validation_loss_logged_and_plotted(tmp_path):
    """With examples held out, every log record carries the model's loss on them (the same
    examples and noise each time), and --plot draws it beside the training loss."""
    slides = tmp_path / "slides"
    slides.mkdir()
    for k in range(2):
        os.symlink(SLIDE, slides / f"s{k}.svs")
    train.main(["--preset", "tiny", "--stage", "1", "--level", "0", "--data", str(slides),
                "--out", str(tmp_path / "ck"), "--cache", str(tmp_path / "c"), "--holdout",
                "0.5", "--max-steps", "10", "--log-every", "5", "--batch", "2", "--keep", "0"])
    from operations import logs, previews
    recs = logs.read_log(tmp_path / "ck" / "stage1_level0.log.jsonl")
    assert [r["step"] for r in recs] == [1, 5, 10] and all(r["val_loss"] > 0 for r in recs)
    png = np.asarray(Image.open(previews.plot_curves(str(tmp_path / "ck"))).convert("RGB"))
    assert ((png == (220, 110, 20)).all(-1)).sum() > 20  # the validation curve, orange


@pytest.mark.parametrize("case", [f"stage{s}_level{lvl}" for s in (1, 3) for lvl in range(3)])
def test_the_papers_sampler_gives_imagens_pixels(case, monkeypatch):
    """One level of `paper`'s cascade (cascade.CDM.sample_level: the low-res input and its noise,
    the context in [0, 1], sde.sample's ancestral steps, thresholding, paste, both ends) against
    imagen-pytorch 1.26.0's own Imagen.sample with the same tiny U-Nets and the same Gaussian
    draws, at 4 steps: stage 1 (plain) and stage 3 (a context and known pixels), levels 0-2
    (eps / v / v, cosine / cosine / linear). tests/data/imagen_sampler.pt was made once with
        pip install --no-deps --target /tmp/imagen imagen-pytorch==1.26.0 einops beartype
        python tests/bench_authors.py /tmp/imagen --sampler-fixture tests/data/imagen_sampler.pt
    It holds the seed and the shapes of the draws imagen made (in order), its output and our
    configs; inputs and weights are made again by arithmetic (bench_authors). Ours replays the
    draws in its own order. Seen failing (of the 6 cases) with 'clamped' ends (6), lam(1) alone
    clamped to -30 (4: the linear schedule's lam(1) is -10), the last step returning x0_hat (6), no
    thresholding (6), the known pixels noised to s instead of t (3: the stage-3 cases) and pasted
    after the network call (3)."""
    import bench_authors as ba
    from conftest import ROOT
    fx = torch.load(os.path.join(ROOT, "tests", "data", "imagen_sampler.pt"),
                    weights_only=True)[case]
    stage, level = int(case[5]), int(case[-1])
    nets = []
    for cfg in fx["configs"]:
        nets.append(unet.build(unet.UNetConfig(**cfg)).eval())
        ba.formula_weights(nets[-1])
    paper = cascade.get_preset("paper")
    p = dataclasses.replace(paper, patch=ba.SAMPLER_SIZES[-1], level_sizes=ba.SAMPLER_SIZES,
                            sampling=dataclasses.replace(paper.sampling,
                                                         steps=(ba.SAMPLER_STEPS,) * 3))
    g = torch.Generator().manual_seed(fx["seed"])
    draws = [torch.randn(shape, generator=g) for shape in fx["shapes"]]

    def replay(shape, *args, **kwargs):  # imagen's draws, in the order ours asks for them
        assert tuple(shape) == tuple(draws[0].shape), (shape, draws[0].shape)
        return draws.pop(0)
    monkeypatch.setattr(sde, "randn", replay)
    lower, context, known, mask = ba.sampler_inputs(stage, level)
    with torch.no_grad():
        out = cascade.CDM(p, stage, nets).sample_level(level, lower, [None] * ba.SAMPLER_BATCH,
                                                       known, mask, context, None, p.sampling)
    assert float((out - fx["output"]).abs().max()) <= 1e-4
    assert len(draws) <= 1  # all of imagen's draws but its last step's, which it multiplies by 0
