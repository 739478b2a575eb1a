"""Windows (sample.py --window / --patches): a crop of the final slide made from only the patches
it depends on holds exactly the whole slide's pixels; random windows on tissue, their manifest,
resume, and metrics.py on them."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import cascade
import data
import metrics
from conftest import (demo_windows as _demo_windows, one_line_error as _one_line_error, ROOT,
                      sample_cli as _sample, SLIDE)
from operations import aperio, windows
from test_metrics import random_net


def _run(*argv):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *map(str, argv)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_closure_by_hand():
    """tiny's stage 3: 4 x 4 patches of 32 px, stride 28, interior of patch (1, 1): [32, 56)."""
    grid = cascade.Grid(32, 4)
    inside = [(33, 41, 33, 41)]  # (y0, y1, x0, x1), met by patch (1, 1) alone
    assert windows.cells_over(grid, inside[0]) == {(1, 1)}
    # checkerboard: (1, 1) is of the last phase; its 8 neighbours are earlier, and of those
    # (1, 2) (phase 2) also needs (0, 3) and (2, 3) (phase 1)
    assert windows.closure(grid, "checkerboard", inside) == {
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (0, 3), (2, 3)}
    # wavefront (round 2i + j): (1, 1) is round 3; (0, 0), (0, 1), (0, 2), (1, 0) come before
    assert windows.closure(grid, "wavefront", inside) == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)}
    # a window across the border of four patches meets all four
    assert windows.cells_over(grid, (27, 33, 27, 33)) == {(0, 0), (0, 1), (1, 0), (1, 1)}


@pytest.mark.slow
@pytest.mark.parametrize("order", ["checkerboard", "wavefront"])
def test_window_is_the_crop_of_the_whole_slide(tmp_path, tiny_ckpt, order):
    """tiny models, --batch 1: each window, and its field in stage 2, byte for byte the crop of
    the whole slide's stage images with the same seed."""
    common = ["--preset", "tiny", "--ckpt", tiny_ckpt, "--device", "cpu", "--batch", "1",
              "--order", order, "--edge-margin", "1", "--feather", "2", "--seed", "3"]
    _run(*common, "--out", tmp_path / "whole.tif", "--keep-work")
    stage3 = np.load(tmp_path / "whole.tif.work" / "stage3.npy")
    stage2 = np.load(tmp_path / "whole.tif.work" / "stage2.npy")
    windows = [(40, 35, 20, 30), (0, 90, 26, 26)]  # inside; at the bottom-left border
    res = _run(*common, "--out", tmp_path / "w.tif", "--lower-windows",
               *[v for w in windows for v in ("--window", *w)])
    assert "windows: stage 3:" in res.stderr
    manifest = json.load(open(tmp_path / "w.tif.windows.json"))
    assert manifest["seed"] == 3 and len(manifest["windows"]) == 2
    for (x, y, w, h), rec in zip(windows, manifest["windows"]):
        assert np.array_equal(_png(tmp_path / rec["file"]), stage3[y:y + h, x:x + w])
        bx, by, bw, bh = rec["lower"]["2"]["box"]
        assert np.array_equal(_png(tmp_path / rec["lower"]["2"]["file"]),
                              stage2[by:by + bh, bx:bx + bw])
    assert not os.path.exists(tmp_path / "w.tif")  # no slide: only the windows


@pytest.mark.slow
def test_window_demo_geometry_with_stand_in_models(tmp_path):
    """The demo's 9 x 9 grid (the stand-in models keep known pixels and draw seeded noise): a
    checkerboard window costs a fraction of the slide and equals its crop."""
    common = ["--preset", "demo", "--dry-run", "--order", "checkerboard", "--batch", "1"]
    _run(*common, "--out", tmp_path / "whole.tif", "--keep-work")
    stage3 = np.load(tmp_path / "whole.tif.work" / "stage3.npy")
    res = _run(*common, "--out", tmp_path / "w.tif", "--window", 1000, 700, 256, 256)
    assert "windows: stage 3: 17 of 81 patches" in res.stderr
    assert np.array_equal(_png(tmp_path / "w_x1000_y700_256x256.png"), stage3[700:956, 1000:1256])


def _patches_run(out, size=128):
    return _run("--preset", "demo", "--dry-run", "--order", "checkerboard", "--out", out,
                "--slides", 2, "--patches", 3, "--patch-size", size)


@pytest.mark.slow
def test_patches_on_tissue_with_a_manifest_and_resume(tmp_path):
    out = tmp_path / "set" / "s.tif"
    out.parent.mkdir()
    _patches_run(out)
    slides = json.load(open(f"{out}.manifest.json"))
    assert [r["seed"] for r in slides] == [0, 1]
    first = {}
    for seed in (0, 1):
        m = json.load(open(tmp_path / "set" / f"s_s{seed}.tif.windows.json"))
        assert len(m["windows"]) == 3 and set(m["stages"]) == {"1", "2"}
        stage2 = _png(tmp_path / "set" / m["stages"]["2"])
        r = cascade.stage_size(cascade.get_preset("demo"), 3) / stage2.shape[0]
        for rec in m["windows"]:
            img = _png(tmp_path / "set" / rec["file"])
            assert img.shape == (128, 128, 3) and (rec["w"], rec["h"]) == (128, 128)
            field = stage2[int(rec["y"] / r):int(np.ceil((rec["y"] + 128) / r)),
                           int(rec["x"] / r):int(np.ceil((rec["x"] + 128) / r))]
            assert data.tissue_fraction(field) >= data.MIN_TISSUE  # on tissue, never glass
            first[rec["file"]] = img
    # a rerun skips finished slides; one with its record gone is made again, the same
    os.remove(tmp_path / "set" / "s_s1.tif.json")
    res = _patches_run(out)
    assert "s_s0.tif: done already" in res.stderr and "s_s1.tif: done already" not in res.stderr
    for name, img in first.items():
        assert np.array_equal(_png(tmp_path / "set" / name), img)


@pytest.mark.slow
def test_metrics_from_windows(tmp_path):
    out = tmp_path / "set" / "s.tif"
    out.parent.mkdir()
    _patches_run(out, 256)  # the demo's crops at magnification 2
    net = random_net(tmp_path / "net.pt")
    slide = os.path.join(ROOT, "tests", "data", "cmu_small_region.svs")
    args = ["--real", slide, "--fake", str(out.parent), "--preset", "demo", "--mag", "0", "1", "2",
            "--n", "8", "--inception", net, "--inception-input", "0-255", "--cache", "",
            "--json", str(tmp_path / "m.json")]
    res = metrics.main(args)
    assert res["mag2"]["n_fake"] == 6 and res["mag1"]["n_fake"] > 0 and res["mag0"]["n_fake"] == 2
    assert res["mag2"]["fid"] > 0 and "seam" not in res  # seams need whole slides
    # --window runs make stage 2 only where needed: magnification 1 is refused in one line
    win = tmp_path / "win"
    win.mkdir()
    _run("--preset", "demo", "--dry-run", "--order", "checkerboard", "--out", win / "w.tif",
         "--window", 0, 0, 256, 256)
    with pytest.raises(SystemExit, match="not every run made stage 2 whole"):
        metrics.main(args[:2] + ["--fake", str(win)] + args[4:])


@pytest.mark.slow
def test_metrics_refuses_windows_it_would_score_at_another_magnification(tmp_path):
    """Windows of 64 px (4x zoom when resized to the demo's 256 px crops), a tiny run mixed into a
    demo directory, windows beside whole slides and a malformed manifest were all scored (or
    failed) silently; each is now one line naming the file."""
    net = random_net(tmp_path / "net.pt")
    run = tmp_path / "runs"
    run.mkdir()
    assert _demo_windows(run / "w.tif", "--patches", 2, "--patch-size", 64).returncode == 0
    args = ["--real", SLIDE, "--fake", str(run), "--preset", "demo", "--mag", "2", "--n", "4",
            "--inception", net, "--inception-input", "0-255", "--cache", "",
            "--json", str(tmp_path / "m.json")]
    with pytest.raises(SystemExit, match=r"w_x\d+_y\d+_64x64.png: a 64 x 64 px window .* "
                                         r"compares 256 px crops"):
        metrics.main(args)
    res = metrics.main(args[:-6] + ["--crop", "64", "64", "64"] + args[-6:])  # at 64 px: scored
    assert res["mag2"]["n_fake"] == 2
    os.rename(run / "w.tif.windows.json", tmp_path / "w.json")
    (run / "w.tif.windows.json").write_text("{not json")
    with pytest.raises(SystemExit, match="w.tif.windows.json: not a windows manifest"):
        metrics.main(args)
    os.rename(tmp_path / "w.json", run / "w.tif.windows.json")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    assert _sample("--preset", "tiny", "--dry-run", "--out", tiny / "t.tif", "--patches", 1,
                   "--patch-size", 32).returncode == 0
    os.rename(tiny / "t.tif.windows.json", run / "t.tif.windows.json")
    with pytest.raises(SystemExit, match="t.tif.windows.json: windows made with preset tiny"):
        metrics.main(args)
    os.remove(run / "t.tif.windows.json")
    aperio.write_aperio(str(run / "slide.tif"), np.full((64, 64, 3), 200, np.uint8),
                        compression="zlib")
    with pytest.raises(SystemExit, match="holds 1 windows run.* and 1 slide"):
        metrics.main(args)



@pytest.mark.slow
def test_window_files_are_distinct_and_a_windows_run_is_never_replaced_unasked(tmp_path):
    """Two windows at one X Y wrote one file (the second over the first); a second windows run
    with the same --out replaced the first's windows; a rerun of --slides skipped a seed whose
    window PNG was lost (rc 0), and metrics then stopped on the missing file."""
    out = tmp_path / "w.tif"
    res = _demo_windows(out, "--window", 100, 100, 64, 64, "--window", 100, 100, 32, 48)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.load(open(f"{out}.windows.json"))
    for rec in m["windows"]:
        assert Image.open(tmp_path / rec["file"]).size == (rec["w"], rec["h"])
    assert len({rec["file"] for rec in m["windows"]}) == 2
    assert _one_line_error(_demo_windows(out, "--window", 1, 2, 3, 4, "--window", 1, 2, 3, 4,
                                         "--overwrite"), "--window 1 2 3 4: given twice")
    before = (tmp_path / m["windows"][0]["file"]).read_bytes()
    res = _demo_windows(out, "--window", 100, 100, 64, 64, "--seed", 7)
    assert _one_line_error(res, "w.tif.windows.json exists; pass --overwrite")
    assert (tmp_path / m["windows"][0]["file"]).read_bytes() == before
    # --slides: a lost window of a finished seed is made again, the same
    many = tmp_path / "many"
    many.mkdir()
    cmd = (many / "s.tif", "--slides", 2, "--patches", 2, "--patch-size", 64)
    assert _demo_windows(*cmd).returncode == 0
    rec = json.load(open(many / "s_s1.tif.json"))
    lost = next(n for n in rec["files"] if n.endswith("64x64.png"))
    kept = (many / lost).read_bytes()
    os.remove(many / lost)
    res = _demo_windows(*cmd)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "s_s0.tif: done already" in res.stderr and "s_s1.tif: a file its record" in res.stderr
    assert (many / lost).read_bytes() == kept



@pytest.mark.slow
def test_window_equals_the_whole_slide_with_the_demo_models(tmp_path):
    """The shipped demo U-Nets (their matrix products depend on a batch's other patches): a
    window run generated its patches in other batches than the whole slide at --batch 8 and
    differed from it in 785 of 1600 px (one grey level); now its batches are the whole slide's
    (windows.closure) and the window is the slide's crop byte for byte. Two steps a level: the
    arithmetic of any step count."""
    common = ["--steps", 2, 2, 2]  # on 2 threads: a single thread hides the batch's effect
    whole = _sample(*common, "--out", tmp_path / "whole.tif", "--keep-work", threads="2")
    assert whole.returncode == 0, whole.stderr[-2000:]
    stage3 = np.load(tmp_path / "whole.tif.work" / "stage3.npy")
    res = _sample(*common, "--out", tmp_path / "w.tif", "--window", 1000, 1000, 40, 40,
                  threads="2")
    assert res.returncode == 0, res.stderr[-2000:]
    for rec in json.load(open(tmp_path / "w.tif.windows.json"))["windows"]:
        x, y, w, h = rec["x"], rec["y"], rec["w"], rec["h"]
        got = np.asarray(Image.open(tmp_path / rec["file"]).convert("RGB"))
        assert np.array_equal(got, stage3[y:y + h, x:x + w]), rec["file"]



@pytest.mark.slow
def test_patches_with_no_window_on_tissue_is_one_line_and_the_other_seeds_go_on(tmp_path):
    """--patches where no window lands on tissue ended in KeyError: 3 after stages 1-2, and under
    --slides it ended the whole multi-seed run."""
    glass = tmp_path / "glass.png"
    Image.new("RGB", (2100, 2100), (244, 244, 242)).save(glass)
    zoom = ("--patches", 2, "--from", glass, "--start-stage", 3)  # zoom into a slide of glass
    one = _demo_windows(tmp_path / "a.tif", *zoom)
    assert _one_line_error(one, "no --patches window on tissue"), one.stderr[-1500:]
    many = _demo_windows(tmp_path / "m.tif", *zoom, "--slides", 2)
    assert _one_line_error(many, "2 of 2 seeds made no slide"), many.stderr[-1500:]
    assert many.stderr.count("no --patches window on tissue") == 2  # each seed tried

