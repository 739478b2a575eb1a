"""End to end on the demo preset: train the nine models a few steps on the bundled CC0 slide,
sample a slide from those checkpoints, read it back, and evaluate it with a random network."""
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

import metrics
from conftest import ROOT
from test_metrics import random_net

SLIDE = os.path.join(ROOT, "tests", "data", "cmu_small_region.svs")


@pytest.mark.slow
def test_train_sample_evaluate_demo(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    ckpt, out = tmp_path / "ckpt", tmp_path / "slide.tif"
    train = [sys.executable, os.path.join(ROOT, "train.py"), "--preset", "demo",
             "--stage", "all", "--level", "all", "--data", SLIDE, "--out", str(ckpt),
             "--cache", str(tmp_path / "cache"), "--batch", "2", "--max-steps", "2", "--keep", "0"]
    res = subprocess.run(train, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    export = train[:-4] + ["--export", str(tmp_path / "models")]
    assert subprocess.run(export, capture_output=True, text=True,
                          env=env, timeout=120).returncode == 0
    models = tmp_path / "models"
    assert sum(os.path.getsize(models / f) for f in os.listdir(models)) < 20e6

    sample = [sys.executable, os.path.join(ROOT, "sample.py"), "--preset", "demo", "--ckpt",
              str(tmp_path / "models"),
              "--out", str(out), "--steps", "1", "1", "1", "--batch", "9", "--device", "cpu"]
    res = subprocess.run(sample, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    with tifffile.TiffFile(out) as tif:
        assert tif.is_svs
        assert [lv.shape[-3:-1] for lv in tif.series[0].levels] == [(2048, 2048), (1024, 1024)]
        img = tif.pages[0].asarray()
    assert img.std() > 0
    net = random_net(tmp_path / "net.pt")
    res = metrics.main(["--real", SLIDE, "--fake", str(out), "--mag", "1", "2", "--n", "8",
                        "--inception", net, "--inception-input", "0-255",
                        "--vgg", net, "--preset", "demo", "--cache", "", "--json",
                        str(tmp_path / "m.json"),
                        "--min-tissue", "0"])
    assert res["mag2"]["n_real"] == 8 and res["mag2"]["n_fake"] == 8
    assert np.isfinite(res["mag2"]["fid"])
