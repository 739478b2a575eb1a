"""Faults: kills, broken weights, concurrent runs, full disks, hostile files and absurd flags.
Each test names the defect it guards against; together: nothing lost, nothing silent."""
import fcntl
import gc
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import cascade
import data
import metrics
import sample
import train
from conftest import ROOT, save_tiny_models
from operations import aperio, checkpoints, files, journal, logs, previews, runs, slides

SLIDE = os.path.join(ROOT, "tests", "data", "cmu_small_region.svs")


def _argv(out, ckpt, *extra):
    return ["--preset", "tiny", "--ckpt", ckpt, "--out", str(out), "--compression", "zlib",
            "--device", "cpu",
            "--batch", "2", *extra]


def _cli(*argv, cwd=None):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)


def _one_line_error(res):
    lines = res.stderr.strip().splitlines()
    return (res.returncode != 0 and "Traceback" not in res.stderr and lines
            and lines[-1].startswith("error: "))


# ----------------------------------------- 1. a kill between a round's writes and its journal entry

def test_crash_between_round_write_and_journal_resumes_bit_identical(tmp_path,
                                                                     tiny_ckpt, monkeypatch):
    """With a feathered paste a patch rewrites its neighbours' edge band; regenerating a round
    from that half-applied image drew different patches. The saved round is re-applied instead."""
    run = ("--order", "raster", "--edge-margin", "1", "--feather", "2", "--stream")
    ref, out = tmp_path / "ref.tif", tmp_path / "crashed.tif"
    sample.main(_argv(ref, tiny_ckpt, *run))
    real_mark, calls = journal.Journal.mark, []

    def crash_after_apply(self, stage, results, *a):
        calls.append(stage)
        # round 6 of stage 3 is in the image, not in the journal
        if stage == 3 and calls.count(3) == 6:
            raise KeyboardInterrupt("simulated kill")
        return real_mark(self, stage, results, *a)
    monkeypatch.setattr(journal.Journal, "mark", crash_after_apply)
    try:
        sample.main(_argv(out, tiny_ckpt, *run))
    except KeyboardInterrupt:
        pass
    gc.collect()  # the crashed run's lock file closes, as when its process dies
    monkeypatch.setattr(journal.Journal, "mark", real_mark)
    assert not out.exists() and os.path.exists(str(out) + ".work/round.npz")
    sample.main(_argv(out, tiny_ckpt, *run, "--resume"))
    assert out.read_bytes() == ref.read_bytes()


def test_kill_during_a_background_write_resumes_bit_identical(tmp_path, tiny_ckpt):
    """A round is synced and marked done by a writer thread while the next round computes: the
    process killed (SIGKILL) inside that background write, with the next round under way, resumes
    to the same slide."""
    run = ("--order", "raster", "--edge-margin", "1", "--feather", "2", "--stream")
    ref, out = tmp_path / "ref.tif", tmp_path / "killed.tif"
    sample.main(_argv(ref, tiny_ckpt, *run))
    killer = (
        "import os, signal, threading, torch, sample\n"
        "from operations import journal\n"
        "torch.set_num_threads(2)  # as in this process (conftest): the same arithmetic\n"
        "real, calls = journal.Journal.mark, []\n"
        "def mark(self, stage, results, *a):\n"
        "    calls.append(stage)\n"
        "    if stage == 3 and calls.count(3) == 4:\n"
        "        assert threading.current_thread() is not threading.main_thread()\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(self, stage, results, *a)\n"
        "journal.Journal.mark = mark\n"
        f"sample.main({list(_argv(out, tiny_ckpt, *run))!r})\n")
    res = _cli("-c", killer, cwd=ROOT)
    assert res.returncode == -9, res.stderr[-2000:]
    assert not out.exists() and os.path.exists(str(out) + ".work/round.npz")
    sample.main(_argv(out, tiny_ckpt, *run, "--resume"))
    assert out.read_bytes() == ref.read_bytes()


# ------------------------------------------------------------ 2. broken weights never reach a slide

def test_exploded_weights_are_never_saved(tmp_path):
    args = ["--preset", "tiny", "--data", SLIDE, "--out", str(tmp_path / "ck"), "--cache",
            str(tmp_path / "cache"),
            "--batch", "2", "--stage", "1", "--level", "0", "--keep", "0", "--save-every", "1"]
    train.main(args + ["--max-steps", "1"])
    path = tmp_path / "ck" / "stage1_level0.pt"
    before = path.read_bytes()
    with pytest.raises(SystemExit, match=r"error: weights at step 2 are broken .* not saved"):
        # Adam's first step moves weights by ~lr
        train.main(args + ["--max-steps", "3", "--lr", "1e6"])
    assert path.read_bytes() == before


def test_export_and_load_refuse_broken_weights(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    save_tiny_models(d)
    ck = torch.load(d / "stage1_level0.pt", weights_only=True)
    key = next(k for k, v in ck["ema"].items() if v.is_floating_point() and v.numel() > 1)
    ck["ema"][key][0] = 1e30
    ck.update(model=ck["ema"], step=5)
    torch.save(ck, d / "stage1_level0.pt")
    with pytest.raises(SystemExit,
                       match=r"EMA weights are broken .* beyond fp16's range\); not exported"):
        train.main(["--preset", "tiny", "--stage", "1", "--level", "0", "--out", str(d), "--export",
                    str(tmp_path / "x")])
    ck["ema"][key][0] = float("nan")
    torch.save(ck, d / "stage1_level0.pt")
    with pytest.raises(ValueError, match="is not finite"):
        checkpoints.load_unet(str(d / "stage1_level0.pt"), cascade.get_preset("tiny"), 1, 0)


def test_nonfinite_patch_stops_sampling_loudly(tmp_path):
    """Weights that are finite but overflow the activations: the run ends with one line, no
    slide."""
    d = tmp_path / "ck"
    d.mkdir()
    save_tiny_models(d, std=300.0)
    res = _cli(os.path.join(ROOT, "sample.py"), *_argv(tmp_path / "s.tif", str(d), "--stages", "1"))
    assert _one_line_error(res) and "non-finite pixels" in res.stderr, res.stderr[-1500:]
    assert not (tmp_path / "s.tif").exists()


# ---------------------------------------------------------------- 3. one run per work directory

def test_second_run_refused_while_the_first_holds_the_work_directory(tmp_path, tiny_ckpt):
    out = tmp_path / "s.tif"
    work = tmp_path / "s.tif.work"
    work.mkdir()
    (work / "stage2.npy").write_bytes(b"precious")
    with open(work / "lock", "a+") as lock:  # a running job holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("4242")
        lock.flush()
        res = _cli(os.path.join(ROOT, "sample.py"), *_argv(out, tiny_ckpt, "--overwrite"))
    assert _one_line_error(res) and "in use by another sample.py run (pid 4242)" in res.stderr
    assert (work / "stage2.npy").read_bytes() == b"precious"


# ------------------------------------------------------------ 4. resume notices changed model files

def test_resume_refuses_models_changed_in_place_and_accepts_a_relative_path(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    save_tiny_models(d)
    out = tmp_path / "s.tif"
    res = _cli(os.path.join(ROOT, "sample.py"),
               *_argv("s.tif", "ck", "--stages", "1", "--keep-work"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-1500:]
    os.remove(out)
    res = _cli(os.path.join(ROOT, "sample.py"),
               *_argv(out, str(d), "--stages", "1", "--resume", "--keep-work"))
    assert res.returncode == 0, res.stderr[-1500:]  # the same directory, named absolutely
    os.remove(out)
    save_tiny_models(d, std=0.05)  # retrained in place
    res = _cli(os.path.join(ROOT, "sample.py"), *_argv(out, str(d), "--stages", "1", "--resume"))
    assert _one_line_error(res) and "--resume with other settings" in res.stderr
    assert "models" in res.stderr


# ------------------------------------------------------------ 5. every flag checked before any work

@pytest.mark.parametrize("bad,message", [
    (("--batch", "-1"), "--batch -1"), (("--white-threshold", "2"), "--white-threshold 2.0"),
    (("--mpp", "-1"), "--mpp -1.0"), (("--resample", "0"), "--resample 0"),
    (("--steps", "0", "1", "1"), "--steps"),
    (("--steps", "5", "5"), "--steps [5, 5]: use 3 values (one per level) or 9"),
    (("--threshold", "1.5"), "--threshold 1.5"), (("--aug-level", "-0.1"), "--aug-level -0.1")])
def test_bad_sampling_flags_refused_before_work(tmp_path, tiny_ckpt, bad, message):
    res = _cli(os.path.join(ROOT, "sample.py"), *_argv(tmp_path / "s.tif", tiny_ckpt, *bad))
    assert _one_line_error(res) and message in res.stderr, res.stderr
    assert not os.path.exists(tmp_path / "s.tif.work")


@pytest.mark.parametrize("bad",
                         [("--batch", "0"), ("--lr", "-1"), ("--ema", "1.5"),
                          ("--max-steps", "1", "2")])
def test_bad_training_flags_refused(tmp_path, bad):
    with pytest.raises(SystemExit, match=f"error: {bad[0]}"):
        train.parse_args(["--out", str(tmp_path), *bad])


# --------------------------------------------- 6. the physical scale comes from the training slides

def test_output_mpp_from_the_models(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    save_tiny_models(d, mpp=0.5)
    for k, (extra, mpp) in enumerate((((), 0.5), (("--mpp", "0.3"), 0.3),
                                      (("--stages", "2"), 0.5 * 116 / 88))):
        out = tmp_path / f"s{k}.tif"
        assert _cli(os.path.join(ROOT, "sample.py"), *_argv(out, str(d), *extra)).returncode == 0
        with tifffile.TiffFile(out) as tif:
            desc = tif.pages[0].description
        assert f"|MPP = {mpp:g}|" in desc and f"AppMag = {10 / mpp:g}" in desc, desc


def test_training_records_the_slides_mpp(tmp_path):
    train.main(["--preset", "tiny", "--data", SLIDE, "--out", str(tmp_path / "ck"), "--cache",
                str(tmp_path / "c"),
                "--batch", "1", "--max-steps", "1", "--stage", "3", "--level", "0", "--keep", "0"])
    ck = torch.load(tmp_path / "ck" / "stage3_level0.pt", weights_only=True)
    assert ck["mpp"] == pytest.approx(0.499) and ck["args"]["lr"] == 1e-4


# ---------------------------------------------------- 7. our own outputs are never taken for slides

def test_previews_are_not_slides(tmp_path, monkeypatch):
    d = tmp_path / "slides"
    d.mkdir()
    os.symlink(SLIDE, d / "a.svs")
    for name in ("a.svs.datasets.png", "x.tif.preview.png", "x.tif.thumbnail.png",
                 "loss_curves.png", ".hidden.png",
                 "x.tif.stage1.png", "x.tif.stage2.png"):
        Image.new("RGB", (8, 8)).save(d / name)
    assert slides.list_slides(str(d)) == [str(d / "a.svs")]
    before = sorted(os.listdir(d))
    monkeypatch.chdir(tmp_path)
    previews.inspect_slide([str(d / "a.svs"), "--cache", str(tmp_path / "cache")])
    # the preview lands in the working directory, whole (no temp file left); nothing beside the
    # slides, which may be read-only or shared
    assert sorted(os.listdir(tmp_path)) == ["a.svs.datasets.png", "cache", "slides"]
    assert sorted(os.listdir(d)) == before


# ---------------------------------------------------------- 8, 9. full disks and unwritable outputs

def test_short_write_is_an_error(tmp_path, monkeypatch):
    img = aperio.DiskArray(str(tmp_path / "a.npy"), (8, 8, 3))
    monkeypatch.setattr(os, "pwrite", lambda fd, b, off: len(b) - 1)
    with pytest.raises(OSError, match="short write"):
        img.write(0, 0, np.zeros((8, 8, 3), np.uint8))


def test_disk_full_while_writing_the_slide(tmp_path, tiny_ckpt, monkeypatch, capsys):
    def full(path, *a, **k):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device", path)
    monkeypatch.setattr(runs, "write_aperio", full)
    out = tmp_path / "s.tif"
    with pytest.raises(SystemExit, match="No space left on device; nothing written was lost"):
        runs.one_line_errors(sample.main, _argv(out, tiny_ckpt, "--stages", "1"))
    gc.collect()
    # no slide, no temp file; the work is kept
    assert sorted(os.listdir(tmp_path)) == ["s.tif.work"]
    monkeypatch.undo()
    sample.main(_argv(out, tiny_ckpt, "--stages", "1", "--resume"))
    assert out.exists()


@pytest.mark.parametrize("where", ["directory", "proc"])
def test_unwritable_out_refused_at_once(tmp_path, tiny_ckpt, where):
    out = str(tmp_path) if where == "directory" else "/proc/urcdm_test.tif"
    res = _cli(os.path.join(ROOT, "sample.py"), *_argv(out, tiny_ckpt))
    assert _one_line_error(res), res.stderr


# ------------------------------------------------------- 10. a failed start does not block the next

def test_work_directory_without_finished_patches_does_not_block(tmp_path, tiny_ckpt):
    out = tmp_path / "s.tif"
    os.makedirs(str(out) + ".work")
    files.write_json(str(out) + ".work/journal.json", {"settings": {}, "done": {}, "filled": {}})
    res = _cli(os.path.join(ROOT, "sample.py"), *_argv(out, tiny_ckpt, "--stages", "1"))
    assert res.returncode == 0, res.stderr[-1500:]


# ------------------------------------------------------------- 11. 16-bit slides and absurd headers

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


# ---------------------------------------------------------------- 12. metrics: bad files and flags

def test_metrics_bad_inputs_one_line(tmp_path):
    patches = tmp_path / "p"
    patches.mkdir()
    for k in range(4):
        Image.new("RGB", (32, 32), (k * 40, 100, 150)).save(patches / f"{k}.png")
    (patches / "4.png").write_bytes(b"not a png")
    from test_metrics import random_net
    net = random_net(tmp_path / "net.pt")
    base = ["--real", str(patches), "--fake", str(patches), "--preset", "tiny", "--cache", "",
            "--mag", "2",
            "--json", str(tmp_path / "m.json"), "--inception-input", "0-255"]
    with pytest.raises(SystemExit, match="4.png: not a readable image"):
        metrics.main(base + ["--inception", net])
    (tmp_path / "bad_vgg.pt").write_bytes(b"junk")
    os.remove(patches / "4.png")
    with pytest.raises(SystemExit, match="--vgg .*bad_vgg.pt: neither a TorchScript file"):
        metrics.main(base + ["--inception", net, "--vgg", str(tmp_path / "bad_vgg.pt")])
    with pytest.raises(SystemExit, match="--k 0: use a value >= 1"):
        metrics.main(base + ["--inception", net, "--k", "0"])


# --------------------------------------------------------- 13. orphaned temp files of a killed save

def test_orphaned_checkpoint_temps_are_removed(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    orphan = d / f"stage1_level0.tmp{int(dead.stdout)}.pt"
    orphan.write_bytes(b"half a checkpoint")
    train.main(["--preset", "tiny", "--data", SLIDE, "--out", str(d), "--cache",
                str(tmp_path / "c"), "--batch", "1",
                "--max-steps", "1", "--keep", "0"])
    assert not orphan.exists()


# ------------------------------------------------------- 14. progress counts generated patches only

def test_eta_ignores_filled_patches(capsys):
    """The time left counts the patches still to generate at the generation rate: filled (glass)
    patches cost next to nothing."""
    progress = logs.Progress(3, 30, n_fill=16)
    progress.eta.t0 -= 4.0
    # 4 generated in ~4 s, 6 filled at once
    progress.update([((0, k), None, k < 6) for k in range(10)])
    err = capsys.readouterr().err
    assert "10/30 patches (4 generated, 6 filled as glass)" in err
    assert "left: 10 to generate, 10 to fill" in err
    eta = float(err.split("ETA ")[1].split(" min")[0])
    assert eta == pytest.approx(10 / 1.0 / 60, abs=0.05)  # 10 to generate at ~1 generated patch/s
