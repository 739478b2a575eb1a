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
from conftest import ROOT
from test_metrics import random_net
from operations import windows


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
