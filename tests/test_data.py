"""data.py: region reads against the source array, tissue, the nine datasets, cache, bad input."""
import dataclasses
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import cascade
import data
from conftest import cli as _cli, one_line_error as _one_line_error, ROOT, SLIDE, small_preset
from operations import aperio, caches, previews, pyramid, slides as slide_io


CMU = SLIDE


def synthetic_rgb(h=1200, w=1000, seed=0):
    """Tissue-like test image: pink/purple stripes (period 24 px) and blobs on the left, glass on
    the right third. Structured at all scales, so a misplaced read is visible."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (yy + 0.5 * xx) / 24)
    blobs = np.zeros((h, w))
    for cy, cx, r in zip(rng.integers(0, h, 30), rng.integers(0, w, 30), rng.integers(10, 60, 30)):
        blobs = np.maximum(blobs, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * r * r)))
    t = np.clip(0.6 * stripes + 0.6 * blobs, 0, 1)[..., None]
    rgb = (1 - t) * np.array([230, 150, 200]) + t * np.array([110, 50, 140])
    rgb[:, 2 * w // 3:] = 245  # background glass
    return rgb.round().astype(np.uint8)


def write_slide(path, img, kind="svs", compression="zlib"):
    if kind == "svs":
        aperio.write_aperio(path, img, tile=128, mpp=0.5, compression=compression, min_side=200)
        return
    levels = [img]
    while max(levels[-1].shape[:2]) > 200:
        nxt = np.zeros(((levels[-1].shape[0] + 1) // 2,
                        (levels[-1].shape[1] + 1) // 2, 3), np.uint8)
        aperio.halve(levels[-1], nxt)
        levels.append(nxt)
    kw = dict(tile=(128, 128), photometric="rgb", compression=compression)
    with tifffile.TiffWriter(path, bigtiff=True, ome=kind == "ome") as tif:
        if kind == "ome":
            tif.write(levels[0], subifds=len(levels) - 1,
                      metadata={"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}, **kw)
            for lv in levels[1:]:
                tif.write(lv, subfiletype=1, **kw)
        else:  # generic pyramidal TIFF: reduced-resolution pages
            tif.write(levels[0], resolution=(20000, 20000), resolutionunit="CENTIMETER", **kw)
            for lv in levels[1:]:
                tif.write(lv, subfiletype=1, **kw)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    img = synthetic_rgb()
    paths = {}
    for kind, comp in (("svs", "zlib"), ("svs", "jpeg"), ("tiff", "zlib"), ("ome", "zlib")):
        paths[kind, comp] = str(d / f"{kind}_{comp}.{'svs' if kind == 'svs' else 'tif'}")
        write_slide(paths[kind, comp], img, kind, comp)
    return img, paths


def reference(img, x, y, w, h, ds):
    """The region cut from the source array, area-resampled, padded with 255 outside."""
    pad = 64
    big = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
    box = (x + pad, y + pad, x + pad + w * ds, y + pad + h * ds)
    return np.asarray(Image.fromarray(big).resize((w, h), Image.BOX, box=box)).astype(int)


@pytest.mark.parametrize("key",
                         [("svs", "zlib"), ("svs", "jpeg"), ("tiff", "zlib"), ("ome", "zlib")])
@pytest.mark.parametrize("ds", [1, 2, 4, 6.25])
def test_read_region_matches_source(slides, key, ds):
    img, paths = slides
    slide = data.open_slide(paths[key])
    assert slide.dimensions == (1000, 1200) and slide.mpp == pytest.approx(0.5)
    assert len(slide.level_downsamples) == 4
    x, y, w, h = 100, 64, 96, 80
    got, ref = slide.read_region(x, y, w, h, ds).astype(int), reference(img, x, y, w, h, ds)
    err = np.abs(got - ref)
    # lossless: exact at level 0; levels are rounded 2x2 means
    if key[1] == "zlib" and ds == int(ds):
        assert err.max() <= (0 if ds == 1 else 2), err.max()
    elif key[1] == "zlib":  # 6.25 = level 4x, then 1.5625 over its pixels, taken as uniform blocks
        assert err.mean() < 4, err.mean()
    else:  # JPEG quality 90
        assert err.mean() < 6 and np.percentile(err, 99) < 24, (err.mean(), err.max())


def test_read_region_out_of_bounds_is_background(slides):
    img, paths = slides
    slide = data.open_slide(paths["svs", "zlib"])
    r = slide.read_region(-50, 1150, 100, 100, 1.0)
    assert (r[:, :50] == 255).all() and (r[50:] == 255).all()
    assert np.array_equal(r[:50, 50:], img[1150:, :50])


def test_real_aperio_slide():
    slide = data.open_slide(CMU)
    assert slide.dimensions == (2220, 2967) and slide.mpp == pytest.approx(0.499)
    r = slide.read_region(1000, 1000, 64, 64)
    assert r.shape == (64, 64, 3) and r.dtype == np.uint8


def test_tissue_detection(slides):
    img, _ = slides
    m = data.tissue_mask(img)
    assert m[:, :600].mean() > 0.95 and not m[:, 700:].any()
    assert data.tissue_fraction(img) == pytest.approx(2 / 3, abs=0.02)
    assert data.tissue_fraction(np.zeros((8, 8, 3), np.uint8)) == 0  # black is not tissue


def test_nine_datasets_shapes_and_ranges(slides, tmp_path):
    _, paths = slides
    p = small_preset()
    for stage in (1, 2, 3):
        for level in range(3):
            ds = data.StageLevelDataset([paths["svs", "zlib"]], p, stage, level, area_size=400,
                                        cache_dir=str(tmp_path), length=4)
            item = ds[1]
            L = p.level_sizes[level] if level < 2 else p.training.crop
            assert item["x0"].shape == (3, L, L)
            assert item["cond"].shape == (cascade.cond_channels(p, stage, level), L, L)
            assert item["skipped"] == ""  # every draw readable
            for t in (item["x0"], item["cond"]):
                assert t.dtype == torch.float32
                assert t.numel() == 0 or t.min() >= -1 and t.max() <= 1
            assert torch.equal(ds[1]["x0"], item["x0"])  # a pure function of (seed, idx)


def _corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("positions", ["area", "grid"])
@pytest.mark.parametrize("stage", [2, 3])
def test_conditioning_aligned_with_target(tmp_path, stage, positions):
    """On a slide of smooth waves (periods 150 / 170 px: resolved at every stage) the region
    crop (the stage below, upsampled) must line up with the target: high correlation; the
    same crop 8 stage pixels (a quarter wave) off does not."""
    yy, xx = np.meshgrid(np.arange(700), np.arange(700), indexing="ij")
    t = (0.5 + 0.25 * np.sin(2 * np.pi * yy / 150) + 0.25 * np.sin(2 * np.pi * xx / 170))[..., None]
    img = (1 - t) * np.array([230, 150, 200]) + t * np.array([110, 50, 140])
    img = img.round().astype(np.uint8)
    path = str(tmp_path / "waves.svs")
    write_slide(path, img)
    p = small_preset()
    p = dataclasses.replace(p, training=dataclasses.replace(p.training, positions=positions))
    ds = data.StageLevelDataset([path], p, stage, 1, area_size=600, cache_dir=str(tmp_path),
                                augment=False, min_tissue=0.9)
    for idx in range(3):
        item = ds[idx]
        # level 1: lowres | context | region
        target, region = item["x0"].mean(0), item["cond"][6:9].mean(0)
        assert _corr(target, region) > 0.8
        # 8 stage px off in y and x
        assert _corr(target, torch.roll(region, (4, 4), dims=(0, 1))) < 0.5
        lowres = cascade.make_lowres(cascade.downsample(item["x0"][None], 8), 16)[0]
        assert _corr(lowres.mean(0), target) > 0.8


def test_dihedral_same_for_target_and_conditioning():
    x = torch.arange(2 * 9 * 4 * 4, dtype=torch.float32).reshape(2, 9, 4, 4)
    outs = {tuple(data.dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(outs) == 8
    for k in range(8):  # each channel group gets the same symmetry
        y = data.dihedral(x, k)
        assert torch.equal(y[:, 3:6] - 48, y[:, :3]) and torch.equal(y[:, 6:9] - 96, y[:, :3])


def test_cache_built_once(slides, tmp_path, monkeypatch):
    _, paths = slides
    calls = []
    real = caches.build_image
    monkeypatch.setattr(caches, "build_image", lambda *a, **k: (calls.append(a), real(*a, **k)))
    p = small_preset()
    c1 = data.slide_cache(paths["svs", "zlib"], p, 400, cache_dir=str(tmp_path))
    c2 = data.slide_cache(paths["svs", "zlib"], p, 400, cache_dir=str(tmp_path))
    assert len(calls) == 2  # stage 1 and stage 2, once
    assert c1["stage2"].shape == (88, 88, 3) and np.array_equal(c1["stage2"], c2["stage2"])
    ds = data.StageLevelDataset([paths["svs", "zlib"]], p, 2, 0, area_size=400,
                                cache_dir=str(tmp_path))
    monkeypatch.setattr(data, "open_slide",
                        lambda *a: pytest.fail("stage-2 samples must not re-read the slide"))
    for idx in range(5):
        ds[idx]


# ---------------------------------------------------------------- bad input

def test_bad_inputs_give_one_line_errors(tmp_path, slides):
    _, paths = slides
    cases = {}
    cases["missing"] = str(tmp_path / "nope.svs")
    (tmp_path / "notes.svs").write_text("this is not a slide")
    cases["not an image"] = str(tmp_path / "notes.svs")
    raw = open(paths["svs", "zlib"], "rb").read()
    (tmp_path / "trunc.svs").write_bytes(raw[:len(raw) // 3])
    cases["truncated"] = str(tmp_path / "trunc.svs")
    Image.new("CMYK", (32, 32)).save(tmp_path / "cmyk.jpg")
    cases["cmyk"] = str(tmp_path / "cmyk.jpg")
    tifffile.imwrite(tmp_path / "cmyk.tif", np.zeros((64, 64, 4), np.uint8),
                     photometric="separated", tile=(32, 32))
    cases["cmyk tiff"] = str(tmp_path / "cmyk.tif")
    for name, path in cases.items():
        with pytest.raises(data.SlideError) as e:
            data.open_slide(path).read_region(0, 0, 900, 900, 1)
        msg = str(e.value)
        assert "\n" not in msg and os.path.basename(path) in msg, (name, msg)


def test_corrupt_tile_is_reported(tmp_path, slides):
    _, paths = slides
    path = tmp_path / "corrupt.svs"
    shutil.copy(paths["svs", "jpeg"], path)
    page = tifffile.TiffFile(path).pages[0]
    off, n = page.dataoffsets[3], page.databytecounts[3]
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(b"\x00" * n)
    slide = data.open_slide(str(path))
    with pytest.raises(data.SlideError, match="corrupt tile 3"):
        slide.read_region(0, 0, 1000, 300)


def test_colour_layouts_converted(tmp_path):
    gray = (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    r = data.open_slide(str(tmp_path / "gray.png")).read_region(0, 0, 64, 64)
    assert np.array_equal(r, np.repeat(gray[..., None], 3, -1))
    tifffile.imwrite(tmp_path / "gray.tif", gray, tile=(32, 32))
    assert np.array_equal(data.open_slide(str(tmp_path / "gray.tif")).read_region(0, 0, 64, 64), r)
    rgb = synthetic_rgb(64, 48)
    tifffile.imwrite(tmp_path / "plain.tif", rgb)  # stripped, not tiled
    slide = data.open_slide(str(tmp_path / "plain.tif"))
    assert np.array_equal(slide.read_region(0, 0, 48, 64), rgb)

    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent -> white
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert (data.open_slide(str(tmp_path / "rgba.png")).read_region(0, 0, 8, 8) == 255).all()


def test_small_slide_padded_with_warning(tmp_path):
    Image.fromarray(synthetic_rgb(100, 120)).save(tmp_path / "small.png")
    slide = data.open_slide(str(tmp_path / "small.png"))
    with pytest.warns(UserWarning, match="smaller than the 400 px area"):
        x, y = data.choose_area(slide, 400)
    assert (x, y) == (-140, -150)


def test_directory_with_a_bad_file(tmp_path, slides, capsys):
    _, paths = slides
    shutil.copy(paths["svs", "zlib"], tmp_path / "good.svs")
    (tmp_path / "bad.svs").write_text("garbage")
    assert slide_io.list_slides(str(tmp_path)) == [str(tmp_path / "good.svs")]
    err = capsys.readouterr().err
    assert "bad.svs" in err and "1 of 2 slides usable, 1 skipped" in err


def test_cli_prints_and_writes_preview(tmp_path, capsys):
    out = tmp_path / "preview.png"
    previews.inspect_slide([CMU, "--out", str(out), "--cache", str(tmp_path / "cache")])
    text = capsys.readouterr().out
    assert "2220 x 2967" in text and "MPP 0.499" in text and "tissue fraction" in text
    assert Image.open(out).size[1] > 9 * 128


@pytest.mark.parametrize("region,resize,positions", [(False, "area", "area"),
                                                     (True, "area", "area"),
                                                     (False, "nearest", "area"),
                                                     (True, "nearest", "grid")])
def test_training_inputs_are_what_sampling_feeds(tmp_path, region, resize, positions):
    """The loader's lean route (uint8 crops reduced to the level's size by box sums in integers,
    the symmetry on the small arrays, one conversion) gives what sampling's float route gives
    from the same crops: cascade.level_inputs on to_float(target) / to_float(context) and
    region_crop, as tiler.Lower feeds them. Tolerance 1e-5: only the float rounding of an area
    mean differs (the integer sums are exact). 'nearest' (the paper's resizing) picks pixels."""
    p = small_preset(region=region, resize=resize)
    p = dataclasses.replace(p, training=dataclasses.replace(p.training, positions=positions))
    for stage in (1, 2, 3):
        for level in range(3):
            ds = data.StageLevelDataset([SLIDE], p, stage, level, cache_dir=str(tmp_path),
                                        augment=False)
            seen = []
            real_crop = ds._crop
            ds._crop = lambda *a: (lambda c: seen.append(c) or c)(real_crop(*a))
            item = ds[3]
            target, context, reg = seen[0]
            L = p.level_sizes[level]
            x0 = cascade.downsample(cascade.to_float(target), L, resize)
            ctx = None if context is None else cascade.to_float(context)
            cond = cascade.level_inputs(p, stage, level, cascade.to_float(target), ctx, reg)
            if level == 2 and p.training.crop < L:  # the top level's crop: compare where it is
                full = torch.cat([x0] + ([] if cond is None else [cond]), 1)[0]
                c = p.training.crop
                got = torch.cat([item["x0"], item["cond"]])
                hits = [(y, x) for y in range(L - c + 1) for x in range(L - c + 1)
                        if (full[:, y:y + c, x:x + c] - got).abs().max() < 1e-5]
                assert hits, (stage, level)
                continue
            assert (item["x0"] - x0[0]).abs().max() < 1e-5, (stage, level)
            if cond is not None:
                assert (item["cond"] - cond[0]).abs().max() < 1e-5, (stage, level)


@pytest.mark.parametrize("mode", ["area", "nearest"])
def test_the_fast_resize_equals_the_reference(mode, monkeypatch):
    """data.resized's fast route (operations/pyramid.py: integer block sums or picks, the symmetry
    on the small array) gives its reference's values (floats, the symmetry, cascade.downsample), at
    every symmetry, integer factors 1, 2, 3 and 8 and with a window; several sizes in one pass
    equal one at a time. Seen failing with the symmetry applied after picking ('nearest')."""
    u8 = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    for k in range(8):
        for size in (96, 48, 32, 12):
            for window in (None, (3, 5, 8)):
                monkeypatch.setattr(data, "FAST_RESIZE", False)
                ref = data.resized(u8, size, k, mode, window)
                monkeypatch.setattr(data, "FAST_RESIZE", True)
                got = data.resized(u8, size, k, mode, window)
                assert ref.shape == got.shape and (got - ref).abs().max() < 1e-5, (k, size)
        both = pyramid.box_pyramid(u8, [48, 12], k, mode=mode)  # one pass, several sizes
        assert all(torch.equal(both[s], pyramid.box_pyramid(u8, [s], k, mode=mode)[s])
                   for s in (48, 12))


def test_cache_built_by_local_ranks_in_parallel(tmp_path, monkeypatch):
    """Each local rank builds every world-th missing slide's stage images, then waits for the
    others'; a second pass finds them all built. Two ranks play here in two threads."""
    import threading
    (tmp_path / "slides").mkdir()
    for k in range(5):
        os.symlink(SLIDE, tmp_path / "slides" / f"s{k}.svs")
    paths = slide_io.list_slides(str(tmp_path / "slides"))
    built, real = [], data.build_cache
    monkeypatch.setattr(data, "build_cache", lambda path, *a: (built.append(
        (threading.current_thread().name, os.path.basename(path))), real(path, *a)))
    p = small_preset()
    out = {}
    ranks = [threading.Thread(name=str(r), target=lambda r=r: out.__setitem__(
        r, data.slide_caches(paths, p, None, str(tmp_path / "cache"), rank=r, world=2)))
        for r in (0, 1)]
    for t in ranks:
        t.start()
    for t in ranks:
        t.join()
    assert out[0] == out[1] and all(os.path.exists(b + ".json") for b in out[0].values())
    assert sorted(n for r, n in built if r == "0") == ["s0.svs", "s2.svs", "s4.svs"]
    assert sorted(n for r, n in built if r == "1") == ["s1.svs", "s3.svs"]
    built.clear()
    assert data.slide_caches(paths, p, None, str(tmp_path / "cache")) == out[0] and not built


def test_grid_tissue_is_skimages_hsv_rule():
    """The authors' block test: hue > 0.5, saturation > 0.1, value < 0.9, hue and saturation as
    skimage computes them (colorsys agrees with it, ties included)."""
    import colorsys
    rgb = np.random.default_rng(0).integers(0, 256, (4000, 3)).astype(np.uint8)
    ties = np.array([[200, 100, 200], [200, 200, 100], [100, 200, 200], [90, 90, 90]], np.uint8)
    rgb = np.concatenate([rgb, ties])
    hsv = np.array([colorsys.rgb_to_hsv(*(c / 255.0)) for c in rgb.astype(np.float64)])
    want = (hsv[:, 0] > 0.5) & (hsv[:, 1] > 0.1) & (hsv[:, 2] < 0.9)
    assert np.array_equal(data.grid_tissue(rgb[None])[0], want) and 0 < want.mean() < 1


def grid_slide(path):
    """192 x 256 px: noisy pink 32 px blocks at (row, col) (1, 2), (3, 5), (4, 0), a noisy green
    one at (2, 2) (saturated, but the wrong hue), noisy glass elsewhere: every 32 px window is
    unique. Returns the image and the tissue blocks' level-0 corners (x, y)."""
    rng = np.random.default_rng(1)
    img = (245 + rng.integers(-3, 4, (192, 256, 3))).astype(np.uint8)
    for (r, c), colour in (((1, 2), (200, 90, 170)), ((3, 5), (190, 80, 160)),
                           ((4, 0), (170, 70, 180)), ((2, 2), (80, 170, 90))):
        noise = rng.integers(-20, 21, (32, 32, 3))
        img[32 * r:32 * r + 32, 32 * c:32 * c + 32] = np.clip(np.array(colour) + noise, 0, 255)
    write_slide(path, img)
    return img, {(64, 32), (160, 96), (0, 128)}


def test_grid_positions_are_the_authors(tmp_path):
    """positions 'grid' [the authors' patient_dataset.py]: the grid holds exactly the tissue
    blocks; a stage-3 target is the slide at a block corner shifted by 0 or half a block in x and
    y (every block and shift drawn), its context the stage-2 field around its centre; stage 2's
    target is the stage-2 field from such a corner."""
    path = str(tmp_path / "grid.svs")
    img, corners = grid_slide(path)
    with data.open_slide(path) as slide:
        assert {tuple(c) for c in data.tissue_grid(slide, 32)} == corners
    p = small_preset(region=False)
    p = dataclasses.replace(p, training=dataclasses.replace(p.training, crop=32, positions="grid"))
    ds3 = data.StageLevelDataset([path], p, 3, 2, cache_dir=str(tmp_path), augment=False)
    ds2 = data.StageLevelDataset([path], p, 2, 2, cache_dir=str(tmp_path), augment=False)
    u8 = lambda t: ((t + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    first_rows = {img[y, x:x + 32].tobytes(): (y, x) for y in range(161) for x in range(225)}
    seen = set()
    with data.open_slide(path) as slide:
        for idx in range(60):
            item = ds3[idx]
            target = u8(item["x0"])
            y, x = first_rows[target[0].tobytes()]  # the noise makes every row unique
            assert np.array_equal(img[y:y + 32, x:x + 32], target)
            hits = [(cx, cy, x - cx, y - cy) for cx, cy in corners if {x - cx, y - cy} <= {0, 16}]
            assert len(hits) == 1, (x, y)
            seen.add(hits[0])
            ds = 116 / 88  # stage-2 px in level-0 px
            context = slide.read_region(x + 16 - 16 * ds, y + 16 - 16 * ds, 32, 32, ds)
            assert np.array_equal(u8(item["cond"][3:6]), context)
        assert {h[:2] for h in seen} == corners and {h[2:] for h in seen} == \
            {(0, 0), (0, 16), (16, 0), (16, 16)}
        fields = [slide.read_region(cx + sx, cy + sy, 32, 32, 116 / 88)
                  for cx, cy in corners for sx in (0, 16) for sy in (0, 16)]
        for idx in range(10):
            target = u8(ds2[idx]["x0"])
            assert sum(np.array_equal(target, f) for f in fields) == 1


def test_grid_without_tissue_is_a_clear_error(tmp_path):
    path = str(tmp_path / "glass.svs")
    write_slide(path, np.full((128, 128, 3), 245, np.uint8))
    p = small_preset()
    p = dataclasses.replace(p, training=dataclasses.replace(p.training, positions="grid"))
    with pytest.raises(data.SlideError, match="tissue test"):
        data.StageLevelDataset([path], p, 3, 0, cache_dir=str(tmp_path))


@pytest.mark.parametrize("resize", ["area", "nearest"])
def test_top_level_crops_see_the_whole_context_resized(tmp_path, resize):
    """training.crop_context 'whole' (imagen-pytorch, `paper`): the target and low-res input are
    cut with one window, the context (and region) are resized whole onto the crop; 'window' cuts
    all of them with it."""
    for mode in ("whole", "window"):
        p = small_preset(region=True, resize=resize)
        p = dataclasses.replace(p, training=dataclasses.replace(p.training, crop_context=mode))
        ds = data.StageLevelDataset([SLIDE], p, 3, 2, cache_dir=str(tmp_path), augment=False)
        seen = []
        real_crop = ds._crop
        ds._crop = lambda *a: (lambda c: seen.append(c) or c)(real_crop(*a))
        item = ds[5]
        target, context, region = seen[0]
        c, L = p.training.crop, p.level_sizes[2]
        full = cascade.level_inputs(p, 3, 2, cascade.to_float(target),
                                    cascade.to_float(context), region)[0]
        x0 = cascade.to_float(target)[0]
        (y, x), = [(y, x) for y in range(L - c + 1) for x in range(L - c + 1)
                   if torch.equal(x0[:, y:y + c, x:x + c], item["x0"])]
        assert (item["cond"][:3] - full[:3, y:y + c, x:x + c]).abs().max() < 1e-5  # low-res
        if mode == "whole":
            want = torch.cat([cascade.downsample(cascade.to_float(context), c, resize),
                              cascade.downsample(region, c, resize)], 1)[0]
        else:
            want = full[3:, y:y + c, x:x + c]
        assert (item["cond"][3:] - want).abs().max() < 1e-5, mode


def test_caches_hold_only_the_stage_images_training_reads(tmp_path):
    """Grid positions read stages 2-3 from the slide: no stage-2 image (6400^2 px, 123 MB a slide
    at paper size, read by no training run) is built; anywhere in the area it is; --from builds
    the one stage image it needs."""
    grid = small_preset(training=dataclasses.replace(small_preset().training, positions="grid"))
    data.StageLevelDataset([SLIDE], grid, 2, 0, cache_dir=str(tmp_path / "g"))
    kinds = lambda d: {".".join(f.split(".")[3:]) for f in os.listdir(d)}  # after the key
    names = kinds(tmp_path / "g")
    assert names == {"stage1.npy", "overview.npy", "grid.npy", "json"}
    data.StageLevelDataset([SLIDE], small_preset(), 2, 0, cache_dir=str(tmp_path / "a"))
    assert kinds(tmp_path / "a") == {"stage1.npy", "stage2.npy", "json"}
    one = data.slide_cache(SLIDE, grid, cache_dir=str(tmp_path / "f"), images=("stage2",))
    assert one["arrays"] == ["stage2"] and "stage1" not in one


def test_previews_are_not_slides(tmp_path, monkeypatch):
    d = tmp_path / "slides"
    d.mkdir()
    os.symlink(SLIDE, d / "a.svs")
    for name in ("a.svs.datasets.png", "x.tif.preview.png", "x.tif.thumbnail.png",
                 "loss_curves.png", ".hidden.png",
                 "x.tif.stage1.png", "x.tif.stage2.png"):
        Image.new("RGB", (8, 8)).save(d / name)
    assert slide_io.list_slides(str(d)) == [str(d / "a.svs")]
    before = sorted(os.listdir(d))
    monkeypatch.chdir(tmp_path)
    previews.inspect_slide([str(d / "a.svs"), "--cache", str(tmp_path / "cache")])
    # the preview lands in the working directory, whole (no temp file left); nothing beside the
    # slides, which may be read-only or shared
    assert sorted(os.listdir(tmp_path)) == ["a.svs.datasets.png", "cache", "slides"]
    assert sorted(os.listdir(d)) == before



def test_16_bit_tiff_is_scaled_to_8_bits(tmp_path):
    rgb16 = np.arange(64 * 64 * 3, dtype=np.uint32).reshape(64, 64, 3) * 7 % 65536
    rgb16 = rgb16.astype(np.uint16)

    tifffile.imwrite(tmp_path / "s16.tif", rgb16, tile=(32, 32), photometric="rgb")
    got = data.open_slide(str(tmp_path / "s16.tif")).read_region(0, 0, 64, 64)
    assert got.dtype == np.uint8 and np.array_equal(got, np.round(rgb16 / 257).astype(np.uint8))



def huge_header_tiff(path, side=200_000, tile=4096):
    """A small file whose header claims side x side px: every tile offset points at one white
    tile."""
    n = (-(-side // tile)) ** 2
    body = zlib.compress(bytes([255]) * (tile * tile * 3))
    tags = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 3, None), (259, 3, 1, 8), (262, 3, 1, 2),
            (277, 3, 1, 3), (284, 3, 1, 1), (322, 3, 1, tile), (323, 3, 1, tile),
            (324, 4, n, None), (325, 4, n, None)]
    ifd = 8
    extra = ifd + 2 + 12 * len(tags) + 4  # where out-of-line values go
    bps, offs, counts, data_at = extra, extra + 6, extra + 6 + 4 * n, extra + 6 + 8 * n
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd) + struct.pack("<H", len(tags)))
    for tag, typ, count, value in tags:
        value = {258: bps, 324: offs, 325: counts}.get(tag, value)
        out += struct.pack("<HHII", tag, typ, count, value) if typ == 4 or tag in (258,) else \
            struct.pack("<HHIHH", tag, typ, count, value, 0)
    out += struct.pack("<I", 0) + struct.pack("<3H", 8, 8, 8)
    out += struct.pack(f"<{n}I", *[data_at] * n) + struct.pack(f"<{n}I", *[len(body)] * n) + body
    with open(path, "wb") as f:
        f.write(out)



def test_absurd_header_is_refused_not_allocated(tmp_path):
    path = str(tmp_path / "huge.tif")
    huge_header_tiff(path)
    assert os.path.getsize(path) < 1e6
    slide = data.open_slide(path)
    assert slide.dimensions == (200_000, 200_000)
    with pytest.raises(data.SlideError, match="no pyramid level near that scale") as e:
        data.StageLevelDataset([path], cascade.get_preset("demo"), 2, 0,
                               cache_dir=str(tmp_path / "c"))
    assert "\n" not in str(e.value)
    res = _cli(os.path.join(ROOT, "train.py"), "--preset", "demo", "--data", path, "--out",
               str(tmp_path / "ck"),
               "--cache", str(tmp_path / "c"), "--max-steps", "1")
    assert _one_line_error(res) and "huge.tif" in res.stderr, res.stderr[-1500:]



def test_area_positions_on_glass_are_refused_as_grid_positions_are(tmp_path):
    """--positions area on slides of glass trained on white crops without a word."""
    import train
    glass = tmp_path / "glass.png"
    Image.new("RGB", (300, 300), (244, 244, 242)).save(glass)
    argv = ["--preset", "tiny", "--stage", "2", "--level", "0", "--data", str(glass),
            "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "ck"), "--max-steps", "1"]
    for positions in ("grid", "area"):
        with pytest.raises(SystemExit, match="glass.png: no"):
            train.main(argv + ["--positions", positions])

