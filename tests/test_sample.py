"""sample.py: the slide file, exact resume after SIGKILL, ranks, refusals."""
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch

import cascade
import data
import unet
from conftest import ROOT


def _cmd(out, ckpt, *extra):
    return [sys.executable, os.path.join(ROOT, "sample.py"), "--preset", "tiny", "--ckpt", ckpt, "--out", str(out),
            "--compression", "zlib", "--device", "cpu", "--batch", "2", *extra]


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, **kw)
    return res


def test_slide_pyramid_equals_canvas(tmp_path, tiny_ckpt):
    out = tmp_path / "s.tif"
    res = _run(_cmd(out, tiny_ckpt, "--keep-work"))
    assert res.returncode == 0, res.stderr[-2000:]
    with tifffile.TiffFile(out) as tif:
        assert tif.is_svs and tif.is_bigtiff
        levels = tif.series[0].levels
        assert [lv.shape[-3:-1] for lv in levels] == [(116, 116)]  # already <= 1024: one level
        assert tif.pages[0].description.startswith("Aperio Image Library")
        assert "|MPP = 0.25" in tif.pages[0].description
        level0 = tif.pages[0].asarray()
    canvas = np.load(str(out) + ".work/stage3.npy")
    assert np.array_equal(level0, canvas)
    for suffix in (".preview.png", ".thumbnail.png"):
        assert os.path.getsize(str(out) + suffix) > 0
    assert "stage 3: 16 patches" in res.stderr and "filled as glass" in res.stderr


def test_writer_pyramid_and_openslide(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (2500, 2100, 3), dtype=np.uint8)
    path = str(tmp_path / "w.svs")
    data.write_aperio(path, img, compression="zlib", mpp=0.5)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_svs
        assert [lv.shape[-3:-1] for lv in tif.series[0].levels] == [(2500, 2100), (1250, 1050), (625, 525)]
        assert np.array_equal(tif.pages[0].asarray(), img)
        assert tif.series[1].name == "Thumbnail"
    openslide = pytest.importorskip("openslide")
    o = openslide.OpenSlide(path)
    assert o.properties["openslide.vendor"] == "aperio" and o.level_count == 3
    assert float(o.properties["openslide.mpp-x"]) == 0.5
    assert np.array_equal(np.asarray(o.read_region((100, 200), 0, (64, 64)))[..., :3], img[200:264, 100:164])


def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_ckpt):
    ref = tmp_path / "ref.tif"
    assert _run(_cmd(ref, tiny_ckpt, "--order", "raster")).returncode == 0
    out = tmp_path / "killed.tif"
    proc = subprocess.Popen(_cmd(out, tiny_ckpt, "--order", "raster"), stderr=subprocess.PIPE, text=True, env=_env())
    for line in proc.stderr:
        if line.startswith("stage 3: 5/16"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    res = _run(_cmd(out, tiny_ckpt, "--order", "raster", "--resume"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "stage 3: 6/16" in res.stderr and "stage 2: 1/9" not in res.stderr  # continued, not restarted
    assert out.read_bytes() == ref.read_bytes()


def test_resume_with_other_settings_refused(tmp_path, tiny_ckpt):
    out = tmp_path / "a.tif"
    assert _run(_cmd(out, tiny_ckpt, "--stages", "1", "--keep-work")).returncode == 0
    os.remove(out)
    res = _run(_cmd(out, tiny_ckpt, "--stages", "1", "--seed", "5", "--resume"))
    assert res.returncode != 0 and "--resume with other settings" in res.stderr and "seed" in res.stderr


def test_refuses_to_overwrite(tmp_path, tiny_ckpt):
    out = tmp_path / "exists.tif"
    out.write_bytes(b"precious")
    res = _run(_cmd(out, tiny_ckpt))
    assert res.returncode != 0 and "exists; pass --overwrite" in res.stderr
    assert out.read_bytes() == b"precious"


def test_bad_or_missing_ckpt(tmp_path, tiny_ckpt):
    res = _run(_cmd(tmp_path / "a.tif", str(tmp_path / "nowhere")))
    assert res.returncode != 0 and "no such directory" in res.stderr and "Traceback" not in res.stderr
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    (bad / "stage1_level0.pt").write_bytes(b"junk")
    res = _run(_cmd(tmp_path / "b.tif", str(bad)))
    assert res.returncode != 0 and "stage1_level0.pt: not a readable URCDM model file" in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_edge_margin(tmp_path, tiny_ckpt):
    res = _run(_cmd(tmp_path / "a.tif", tiny_ckpt, "--edge-margin", "3"))  # tiny: overlap 4
    assert res.returncode != 0 and "--edge-margin" in res.stderr and "margin 3: use 0 to 2" in res.stderr and "Traceback" not in res.stderr
    res = _run(_cmd(tmp_path / "a.tif", tiny_ckpt, "--feather", "-1"))
    assert res.returncode != 0 and "--feather -1: use a value in 0 .. 2 px" in res.stderr and "Traceback" not in res.stderr


def test_two_ranks_bit_identical_to_one(tmp_path, tiny_ckpt):
    one, two = tmp_path / "one.tif", tmp_path / "two.tif"
    assert _run(_cmd(one, tiny_ckpt, "--edge-margin", "1", "--feather", "2")).returncode == 0
    cmd = _cmd(two, tiny_ckpt, "--edge-margin", "1", "--feather", "2")
    cmd[1:2] = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29544", cmd[1]]
    res = _run(cmd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert one.read_bytes() == two.read_bytes()


def test_dry_run_demo_geometry(tmp_path):
    out = tmp_path / "d.tif"
    res = _run([sys.executable, os.path.join(ROOT, "sample.py"), "--preset", "demo", "--dry-run", "--out", str(out)])
    assert res.returncode == 0, res.stderr[-2000:]
    with tifffile.TiffFile(out) as tif:
        assert [lv.shape[-3:-1] for lv in tif.series[0].levels] == [(2048, 2048), (1024, 1024)]
