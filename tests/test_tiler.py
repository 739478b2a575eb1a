"""tiler.py: orders, bit-identity invariants, known pixels, white skip, seams."""
import numpy as np
import pytest
import torch

import cascade
import data
import sde
import tiler
import unet
from conftest import oracle_net, small_preset
import metrics
from operations import costs


def _lower(size=88, seed=0):
    """A smooth pink stage-2 image: conditioning whose misalignment would change the result."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 11, 11, generator=g),
                                        size=(size, size), mode="bilinear")
    rgb = torch.tensor([0.85, 0.55, 0.75]).view(1, 3, 1, 1) * (0.7 + 0.3 * x)
    return (rgb[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def _run(order="raster", batch=1, nets=None, lower="default", seed=0, canvas=None, margin=0,
         white_threshold=0,
         **kw):
    """Stage 3 of the tiny preset with closed-form nets: (canvas, {cell: pixels}, counts, grid)."""
    p = small_preset()
    grid = cascade.Grid(p.patch, p.n_patches[2], margin)
    lower = _lower() if isinstance(lower, str) else lower
    cdm = cascade.CDM(p, 3, nets or [oracle_net()] * 3, conditioned=lower is not None)
    canvas = canvas or tiler.MemoryCanvas(grid.size)
    lower = None if lower is None else tiler.Lower(lower, grid.size / 88)
    white = tiler.WhiteTest(white_threshold, data.tissue_fraction) if white_threshold else None
    results = tiler.generate_stage(cdm.sample, grid, canvas, stage=3, seed=seed, order=order,
                                   batch=batch,
                                   lower=lower, white=white, **kw)
    filled = sum(f for _, _, f in results)
    counts = {"generated": len(results) - filled, "filled": filled}
    return canvas, {c: px for c, px, _ in results}, counts, grid


def test_critical_path_lengths():
    # packed's rounds() are its dependency levels, wavefront's (plan() packs them)
    assert [len(tiler.rounds(o, 46)) for o in tiler.ORDERS] == [2116, 136, 136, 4]
    g = cascade.Grid(1024, 46)
    for order in tiler.ORDERS:
        rnds = tiler.rounds(order, 46)
        assert sorted(c for r in rnds for c in r) == [(i, j) for i in range(46) for j in range(46)]
        for rnd in rnds[:6]:  # patches of a round never overlap
            boxes = [g.origin(i, j) for i, j in rnd]
            assert all(abs(a[0] - b[0]) >= g.patch or abs(a[1] - b[1]) >= g.patch
                       for k, a in enumerate(boxes) for b in boxes[k + 1:])
    idx = tiler.round_index("wavefront", 46)
    for (i, j), k in idx.items():  # raster's dependencies come in earlier rounds
        for d in ((i - 1, j - 1), (i - 1, j), (i - 1, j + 1), (i, j - 1)):
            assert d not in idx or idx[d] < k


def test_known_rects_raster_interior():
    g = cascade.Grid(32, 4)
    before = lambda a, b: (a, b) < (1, 1)
    assert sorted(tiler.known_rects(g, 1, 1, before)) == sorted(
        [(0, 4, 0, 4), (0, 4, 0, 32), (0, 4, 28, 32), (0, 32, 0, 4)])


def test_known_rects_edge_margin():
    """With a margin, a neighbour's inner edges are not known (the patch redraws them); the
    stage's outer border is not trimmed."""
    with pytest.raises(ValueError, match="margin 3: use 0 to 2"):
        # more than half the overlap could not be redrawn from an interior
        cascade.Grid(32, 4, margin=3)
    g = cascade.Grid(32, 4, margin=2)
    assert tiler.trusted_span(g, 0) == (0, 30) and tiler.trusted_span(g, 1) == (30, 58)
    assert tiler.trusted_span(g, 3) == (86, 116)
    before = lambda a, b: (a, b) < (1, 1)
    assert sorted(tiler.known_rects(g, 1, 1, before)) == sorted(
        [(0, 2, 0, 2), (0, 2, 2, 30), (0, 2, 30, 32), (2, 30, 0, 2)])
    mask = tiler.rects_mask(tiler.known_rects(g, 1, 1, before), 32)[0]
    want = torch.zeros(32, 32, dtype=torch.bool)
    want[:2, :] = want[:30, :2] = True  # the overlap (4 px) less the neighbours' 2 px inner edges
    assert torch.equal(mask, want)
    # patch (0, 1): its left neighbour (0, 0) touches the top border, which stays known
    assert tiler.known_rects(g, 0, 1, lambda a, b: (a, b) == (0, 0)) == [(0, 30, 0, 2)]


@pytest.mark.parametrize("margin", [0, 2])
def test_wavefront_equals_raster(margin):
    a = _run("raster", batch=1, margin=margin)[0].array
    b = _run("wavefront", batch=4, margin=margin)[0].array
    assert np.array_equal(a, b)


@pytest.mark.parametrize("order", tiler.ORDERS)
def test_edge_margin_redrawn(order):
    """A stand-in that draws each patch's outer 2 px ring black (an edge artefact) and its
    interior white: with margin 2, no ring pixel survives inside the stage, only on its border;
    with margin 0 the rings of earlier patches stay as lines."""
    def sample_fn(gens, known=None, mask=None, **kw):
        x = torch.ones_like(known)
        x[..., :2, :] = x[..., -2:, :] = x[..., :, :2] = x[..., :, -2:] = -1
        return torch.where(mask, known, x)
    for margin in (0, 2):
        grid = cascade.Grid(32, 4, margin)
        canvas = tiler.MemoryCanvas(grid.size)
        tiler.generate_stage(sample_fn, grid, canvas, stage=3, seed=0, order=order, batch=2)
        dark = canvas.array[..., 0] == 0
        border = np.ones_like(dark)
        border[2:-2, 2:-2] = False
        assert dark[border].all()
        assert dark[~border].any() == (margin == 0), (order, margin)


def test_wavefront_equals_raster_with_unets():
    torch.manual_seed(0)
    p = small_preset()
    nets = []
    for level in range(3):
        net = unet.build(cascade.unet_config(p, 3, level)).eval()
        for prm in net.parameters():  # random, non-zero output
            torch.nn.init.normal_(prm, std=0.05)
        nets.append(net)
    a = _run("raster", batch=1, nets=nets)[0].array
    b = _run("wavefront", batch=1, nets=nets)[0].array
    assert np.array_equal(a, b)


def test_batch_size_invariance():
    assert np.array_equal(_run("wavefront", batch=1)[0].array, _run("wavefront", batch=4)[0].array)
    assert np.array_equal(_run("checkerboard", batch=1)[0].array,
                          _run("checkerboard", batch=3)[0].array)


@pytest.mark.parametrize("order", tiler.ORDERS)
@pytest.mark.parametrize("margin", [0, 2])
def test_known_pixels_equal_neighbours(order, margin):
    """Each patch reproduced its finished neighbours' pixels exactly, so the stitched canvas
    equals every patch's own output over its trusted span (its whole box when margin = 0)."""
    canvas, outputs, stats, grid = _run(order, batch=2, margin=margin)
    assert len(outputs) == grid.n ** 2 and stats["generated"] == grid.n ** 2
    for (i, j), px in outputs.items():
        (y0, y1), (x0, x1) = tiler.trusted_span(grid, i), tiler.trusted_span(grid, j)
        oy, ox = grid.origin(i, j)
        assert np.array_equal(canvas.read(y0, x0, y1 - y0, x1 - x0),
                              px[y0 - oy:y1 - oy, x0 - ox:x1 - ox]), (i, j)


class CountingCanvas(tiler.MemoryCanvas):
    def __init__(self, size):
        super().__init__(size)
        self.count = np.zeros((size, size), dtype=int)

    def write(self, y0, x0, patch):
        super().write(y0, x0, patch)
        self.count[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]] += 1


def _half_white_lower():
    lower = _lower()
    lower[:, :26] = 255  # left: glass under patch column 0 (lower columns 0-24)
    return lower


def test_white_patches_skipped_and_filled():
    lower = _half_white_lower()
    canvas, outputs, stats, grid = _run("raster", lower=lower, white_threshold=0.5,
                                        canvas=CountingCanvas(116))
    assert (canvas.count >= 1).all()  # every pixel written, generated or filled
    assert stats["filled"] == 4 and stats["generated"] == 12  # column 0 lies on glass
    # A skipped patch with no finished neighbour is exactly the upsampled lower region.
    fill = cascade.to_uint8(cascade.region_crop(lower, 0, 0, 32, 116 / 88))[0]
    assert np.array_equal(outputs[(0, 0)], fill)
    assert (outputs[(0, 0)] == 255).all()


def test_white_fill_feathers_known_pixels():
    """A filled (white) patch blends its neighbours' known pixels into the fill like a generated
    one."""
    grid = cascade.Grid(32, 4)
    known_canvas = tiler.MemoryCanvas(116)
    known_canvas.array[:] = np.random.default_rng(0).integers(0, 200, (116, 116, 3), dtype=np.uint8)
    done = [c for c in np.ndindex(4, 4) if c != (1, 1)]
    lower = np.full((88, 88, 3), 255, np.uint8)
    canvas, outputs, stats, _ = _run("raster", lower=lower, white_threshold=0.5,
                                     canvas=known_canvas,
                                     done=done, feather=2)
    assert stats["filled"] == 1 and list(outputs) == [(1, 1)]
    mask = tiler.rects_mask(tiler.known_rects(grid, 1, 1, lambda a, b: (a, b) < (1, 1)), 32)[None]
    w = cascade.feather_weight(mask, 2)[0]
    assert [round(v, 4) for v in w.unique().tolist()] == [0, 0.3333, 0.6667, 1]
    canvas = np.random.default_rng(0).integers(0, 200, (116, 116, 3), dtype=np.uint8)
    known = cascade.to_float(canvas[28:60, 28:60])[0]

    assert np.array_equal(outputs[(1, 1)], cascade.to_uint8((w * known + (1 - w))[None])[0])


def test_outpainting_baseline_runs_without_lower_stage():
    canvas, outputs, stats, grid = _run("wavefront", batch=2, lower=None)
    assert stats["generated"] == 16
    for (i, j), px in outputs.items():
        assert np.array_equal(canvas.read(*grid.origin(i, j), 32, 32), px)


def test_resume_skips_done_patches():
    full = _run("wavefront", batch=2)[0]
    part = tiler.MemoryCanvas(116)
    done = [c for r in tiler.rounds("wavefront", 4)[:5] for c in r]
    for c in done:
        part.write(*cascade.Grid(32, 4).origin(*c),
                   full.read(*cascade.Grid(32, 4).origin(*c), 32, 32))
    resumed, outputs, stats, _ = _run("wavefront", batch=2, canvas=part, done=done)
    assert len(outputs) == 16 - len(done) and set(outputs).isdisjoint(done)
    assert np.array_equal(resumed.array, full.array)


# ---------------------------------------------------------------- seams on a Gaussian random field

def _grf_sampler(P, inpaint=True, resample=1, steps=40, ell=3.0, scale=0.3):
    """Exact patch sampler for a stationary Gaussian random field x0 ~ N(0, K) on P x P
    (squared-exponential K, length ell px, per channel): E[x0 | x_t] = alpha K (alpha^2 K + sigma^2
    I)^-1 x_t."""
    yy, xx = np.meshgrid(np.arange(P), np.arange(P), indexing="ij")
    pts = np.stack([yy.ravel(), xx.ravel()], 1)
    K = np.exp(-((pts[:, None] - pts[None]) ** 2).sum(-1) / (2 * ell ** 2)) + 1e-4 * np.eye(P * P)
    d, U = (torch.tensor(a) for a in np.linalg.eigh(K))

    def v_fn(x, t):
        alpha, sigma = (a.view(-1, 1, 1) for a in sde.alpha_sigma(t.double()))
        xf = x.double().reshape(x.shape[0], 3, P * P)
        x0_hat = ((xf @ U) * (alpha * d / (alpha ** 2 * d + sigma ** 2))) @ U.T
        return ((alpha * xf - x0_hat) / sigma).reshape(x.shape).float()

    def sample_fn(generators, known, mask, context=None, region=None):
        x = sde.sample_general(v_fn, (len(generators), 3, P, P), steps=steps, sampler="ancestral",
                       known=known / scale if inpaint else None,
                       mask=mask if inpaint else None, generator=generators, resample=resample)
        return (x * scale).clamp(-1, 1)
    return sample_fn


def _seam(order, **kw):
    grid = cascade.Grid(16, 6)
    scores = []
    for seed in range(2):
        canvas = tiler.MemoryCanvas(grid.size)
        tiler.generate_stage(_grf_sampler(16, **kw), grid, canvas, stage=2, seed=seed,
                             order=order, batch=8)
        scores.append(metrics.seam_score(canvas.array, grid))
    return float(np.mean(scores))


def test_seam_score_gaussian_random_field():
    """Inpainted stitching is close to seamless (measured ~1.10); independent patches are not
    (~4.3)."""
    inpainted, independent = _seam("wavefront"), _seam("wavefront", inpaint=False)
    assert 0.8 < inpainted < 1.3, inpainted
    assert independent > 2.0 and independent > 1.8 * inpainted, (inpainted, independent)


def test_seam_score_follows_the_margin():
    """With a margin the content switches at origin + o - m (and origin + m): the score must
    look there, not at the overlap's ends."""
    rng = np.random.default_rng(0)
    with_m, without = cascade.Grid(32, 4, margin=1), cascade.Grid(32, 4)
    img = rng.normal(128, 2, (with_m.size, with_m.size))
    for j in range(1, 4):  # a step of 20 grey levels where patch j's redrawn pixels begin
        q = with_m.origin(0, j)[1] + with_m.overlap - with_m.margin
        img[:, q:] += 20
        img[q:, :] += 20
    assert metrics.seam_score(img, with_m) > 3.0
    assert metrics.seam_score(img, without) < 1.2


def test_seam_lines_follow_the_order():
    """The later of two neighbours owns the switch: right / bottom later -> origin + o - m (known
    end) and origin (its write); left / top later -> origin + m and origin + o."""
    g = cascade.Grid(32, 4, margin=1)  # stride 28, overlap 4
    raster = metrics.seam_lines(g, "raster")
    assert raster[:3] == [(31, 28, 0, 32), (59, 56, 0, 32), (87, 84, 0, 32)]
    for t in (False, True):  # checkerboard: odd columns (rows) come after even ones
        chk = metrics.seam_lines(g, "checkerboard", transpose=t)
        assert chk[:3] == [(31, 28, 0, 32), (57, 60, 0, 32), (87, 84, 0, 32)]
        assert chk[3][2:] == (28, 60)


def test_rank_loads_by_hand():
    """A round lasts as long as its busiest rank's patches (ranks take every world-th batch)."""
    sizes = [len(sum(r, [])) for r in tiler.plan("wavefront", 4, 1)]
    assert sizes == [1, 1, 2, 2, 2, 2, 2, 2, 1, 1]
    assert costs.rank_loads(tiler.plan("wavefront", 4, 1), 2) == [1] * 10  # 16 / 20 busy
    assert costs.rank_loads(tiler.plan("wavefront", 4, 2), 2) == sizes  # one batch a round
    assert costs.rank_loads(tiler.plan("checkerboard", 4, 1), 3) == [2, 2, 2, 2]
    # the paper's stage 3 (46 x 46 patches) on 8 ranks at batch 1: 84.8 %, 94.8 % and 98.7 % busy
    busy = lambda order: 46 ** 2 / (8 * sum(costs.rank_loads(tiler.plan(order, 46, 1, world=8),
                                                             8)))
    assert round(busy("wavefront"), 3) == 0.848 and round(busy("checkerboard"), 3) == 0.987
    assert round(busy("packed"), 3) == 0.948 and len(tiler.plan("packed", 46, 1, world=8)) == 279


@pytest.mark.parametrize("n,batch,world", [(46, 1, 8), (9, 3, 2), (4, 2, 3), (7, 1, 1)])
def test_packed_rounds_wait_for_exactly_rasters_neighbours(n, batch, world):
    """plan('packed'): every patch once; a round holds at most `world` batches, each one of
    wavefront's (so its content, and its floats, are the same at any number of ranks); a patch
    runs after each of its raster-earlier neighbours and before each raster-later one."""
    rounds = tiler.plan("packed", n, batch, world=world)
    when = {c: k for k, rnd in enumerate(rounds) for b in rnd for c in b}
    assert sorted(when) == [(i, j) for i in range(n) for j in range(n)]
    assert all(len(rnd) <= world for rnd in rounds)
    wave = [b for rnd in tiler.plan("wavefront", n, batch) for b in rnd]
    assert sorted(b for rnd in rounds for b in rnd) == sorted(wave)
    for (i, j), k in when.items():
        for a, b in ((i - 1, j - 1), (i - 1, j), (i - 1, j + 1), (i, j - 1)):
            if (a, b) in when:
                assert when[(a, b)] < k  # finished before, in raster too
    # resumed after its first rounds (the journal's done patches), the rest is the same plan
    done = [c for rnd in rounds[:3] for b in rnd for c in b]
    assert tiler.plan("packed", n, batch, done, world) == rounds[3:]
