"""sample.py: the slide file, exact resume after SIGKILL, ranks, refusals."""
import fcntl
import gc
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

import cascade
import data
import metrics
import sample
import tiler
from conftest import (cli as _cli, one_line_error as _one_line_error, ROOT, sample_cli as _sample,
                      save_tiny_models, tiny_argv as _argv, torchrun_failure)
from operations import aperio, checkpoints, evaluation, files, journal, logs, runs, slides


def _cmd(out, ckpt, *extra):
    return [sys.executable, os.path.join(ROOT, "sample.py"), "--preset", "tiny", "--ckpt", ckpt,
            "--out", str(out),
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
    aperio.write_aperio(path, img, compression="zlib", mpp=0.5)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_svs
        assert [lv.shape[-3:-1] for lv in tif.series[0].levels] == [(2500, 2100),
                                                                    (1250, 1050), (625, 525)]
        assert np.array_equal(tif.pages[0].asarray(), img)
        assert tif.series[1].name == "Thumbnail"
    openslide = pytest.importorskip("openslide")
    o = openslide.OpenSlide(path)
    assert o.properties["openslide.vendor"] == "aperio" and o.level_count == 3
    assert float(o.properties["openslide.mpp-x"]) == 0.5
    assert np.array_equal(np.asarray(o.read_region((100, 200), 0, (64, 64)))[..., :3],
                          img[200:264, 100:164])


@pytest.mark.slow
@pytest.mark.parametrize("order,kill_at,next_line", [("raster", "5/16", "6/16"),
                                                     ("packed", "6/16", "8/16")])
def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_ckpt, order, kill_at, next_line):
    """Killed (SIGKILL) in stage 3, a run resumed with --resume gives the slide of a run never
    stopped, continuing where it stopped (packed: the same plan for what is left)."""
    ref = tmp_path / "ref.tif"
    assert _run(_cmd(ref, tiny_ckpt, "--order", order)).returncode == 0
    out = tmp_path / "killed.tif"
    proc = subprocess.Popen(_cmd(out, tiny_ckpt, "--order", order, "--stream"),
                            stderr=subprocess.PIPE, text=True, env=_env())
    for line in proc.stderr:
        if line.startswith(f"stage 3: {kill_at}"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    res = _run(_cmd(out, tiny_ckpt, "--order", order, "--resume"))
    assert res.returncode == 0, res.stderr[-2000:]
    # continued, not restarted
    assert f"stage 3: {next_line}" in res.stderr and "stage 2: 1/9" not in res.stderr
    assert out.read_bytes() == ref.read_bytes()


def test_resume_with_other_settings_refused(tmp_path, tiny_ckpt):
    out = tmp_path / "a.tif"
    assert _run(_cmd(out, tiny_ckpt, "--stages", "1", "--keep-work")).returncode == 0
    os.remove(out)
    res = _run(_cmd(out, tiny_ckpt, "--stages", "1", "--seed", "5", "--resume"))
    assert res.returncode != 0 and "--resume with other settings" in res.stderr
    assert "seed" in res.stderr


def test_refuses_to_overwrite(tmp_path, tiny_ckpt):
    out = tmp_path / "exists.tif"
    out.write_bytes(b"precious")
    res = _run(_cmd(out, tiny_ckpt))
    assert res.returncode != 0 and "exists; pass --overwrite" in res.stderr
    assert out.read_bytes() == b"precious"


def test_bad_or_missing_ckpt(tmp_path, tiny_ckpt):
    res = _run(_cmd(tmp_path / "a.tif", str(tmp_path / "nowhere")))
    assert res.returncode != 0 and "no such directory" in res.stderr
    assert "Traceback" not in res.stderr
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    (bad / "stage1_level0.pt").write_bytes(b"junk")
    res = _run(_cmd(tmp_path / "b.tif", str(bad)))
    assert res.returncode != 0 and "stage1_level0.pt: not a readable URCDM model file" in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_edge_margin(tmp_path, tiny_ckpt):
    res = _run(_cmd(tmp_path / "a.tif", tiny_ckpt, "--edge-margin", "3"))  # tiny: overlap 4
    assert res.returncode != 0 and "--edge-margin" in res.stderr
    assert "margin 3: use 0 to 2" in res.stderr and "Traceback" not in res.stderr
    res = _run(_cmd(tmp_path / "a.tif", tiny_ckpt, "--feather", "-1"))
    assert res.returncode != 0 and "--feather -1: use a value in [0, 2] px" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_two_ranks_bit_identical_to_one(tmp_path, tiny_ckpt):
    one, two = tmp_path / "one.tif", tmp_path / "two.tif"
    assert _run(_cmd(one, tiny_ckpt, "--edge-margin", "1", "--feather", "2")).returncode == 0
    cmd = _cmd(two, tiny_ckpt, "--edge-margin", "1", "--feather", "2")
    cmd[1:2] = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29544", cmd[1]]
    res = _run(cmd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert one.read_bytes() == two.read_bytes()


def _ranks(cmd, world, port):
    """cmd under torchrun with `world` ranks (as it is for 1)."""
    if world > 1:
        cmd[1:2] = ["-m", "torch.distributed.run", f"--nproc_per_node={world}",
                    f"--master_port={port}", cmd[1]]
    return cmd


@pytest.mark.slow
def test_packed_rounds_give_rasters_slide_at_any_ranks_and_batch(tmp_path, tiny_ckpt):
    """The packed order (rounds of as many batches as the ranks take, of those ready): the
    slide of raster order (one patch after another), byte for byte, at 1, 2 and 3 ranks and at
    --batch 1 and 2 (tiny stage 3: a 4 x 4 grid, rounds that do not divide among the ranks)."""
    raster = tmp_path / "raster.tif"
    assert _run(_cmd(raster, tiny_ckpt, "--order", "raster", "--batch", "1")).returncode == 0
    for world, batch in ((2, 1), (1, 2), (3, 2)):  # ranks 1-3, batch 1-2, 2-6 patches a round
        out = tmp_path / f"packed{world}_{batch}.tif"
        res = _run(_ranks(_cmd(out, tiny_ckpt, "--order", "packed", "--batch", str(batch)),
                          world, 29547 + world))
        assert res.returncode == 0, res.stderr[-3000:]
        assert out.read_bytes() == raster.read_bytes(), (world, batch)


def test_dry_run_demo_geometry(tmp_path):
    out = tmp_path / "d.tif"
    res = _run([sys.executable, os.path.join(ROOT, "sample.py"), "--preset", "demo",
                "--dry-run", "--out", str(out)])
    assert res.returncode == 0, res.stderr[-2000:]
    with tifffile.TiffFile(out) as tif:
        assert [lv.shape[-3:-1] for lv in tif.series[0].levels] == [(2048, 2048), (1024, 1024)]


@pytest.mark.slow
def test_two_machines_without_a_shared_file_system(tmp_path, tiny_ckpt):
    """Two torchrun launchers (two "nodes", one rank each) in separate directories: only rank 0's
    holds files; the slide equals one process's, byte for byte."""
    one = tmp_path / "one.tif"
    assert _run(_cmd(one, tiny_ckpt, "--edge-margin", "1", "--feather", "2")).returncode == 0
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    procs = []
    for rank, cwd in enumerate(nodes):
        cwd.mkdir()
        cmd = _cmd("s.tif", tiny_ckpt, "--edge-margin", "1", "--feather", "2")
        cmd[1:2] = ["-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                    f"--node_rank={rank}",
                    "--master_addr=127.0.0.1", "--master_port=29561", cmd[1]]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert (nodes[0] / "s.tif").read_bytes() == one.read_bytes()
    assert os.listdir(nodes[1]) == []


SLIDE = os.path.join(ROOT, "tests", "data", "cmu_small_region.svs")


@pytest.mark.slow
def test_zoom_into_a_real_slide_and_evaluate_paired(tmp_path, tiny_ckpt):
    """--from: the real slide's stages 1-2, built as training builds them, stand below a generated
    stage 3 (stage 2 conditions it; both are written as the slide's stage PNGs); metrics then
    compares the generated stage 3 with the real one over the same region."""
    out = tmp_path / "z.tif"
    res = _run(_cmd(out, tiny_ckpt, "--from", SLIDE, "--start-stage", "3", "--keep-work"))
    assert res.returncode == 0, res.stderr[-2000:]
    real = data.slide_cache(SLIDE, cascade.get_preset("tiny"), cache_dir=str(tmp_path / "c"))
    for s in (1, 2):
        assert np.array_equal(np.load(str(out) + f".work/stage{s}.npy"), real[f"stage{s}"])
        assert np.array_equal(np.asarray(Image.open(f"{out}.stage{s}.png")), real[f"stage{s}"])
        assert f"stage {s}: taken from" in res.stderr
    import metrics
    from test_metrics import random_net
    r = metrics.main(["--real", SLIDE, "--fake", str(out), "--preset", "tiny", "--mag", "2", "--n",
                      "6",
                      "--inception", random_net(tmp_path / "net.pt"), "--inception-input", "0-255",
                      "--cache", "",
                      "--json", str(tmp_path / "m.json"), "--min-tissue", "0"])
    assert r["mag2"]["n_fake"] == 6 and np.isfinite(r["mag2"]["fid"])
    assert r["consistency"]["fake"][0][3]["mae"] and 2 in r["consistency"]["fake"][0]


@pytest.mark.slow
def test_zoom_bad_inputs(tmp_path, tiny_ckpt):
    from PIL import Image
    Image.new("RGB", (50, 50), (200, 100, 150)).save(tmp_path / "small.png")
    (tmp_path / "junk.svs").write_bytes(b"junk")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_ckpt, partial)
    os.remove(partial / "stage3_level1.pt")
    for flags, message in ((("--from", str(tmp_path / "junk.svs")), "junk.svs: not"),
                           (("--from", str(tmp_path / "small.png")),
                            "smaller than preset tiny's 116 px area"),
                           (("--from", SLIDE, "--start-stage", "3", "--stages", "2"),
                            "nothing to generate")):
        res = _run(_cmd(tmp_path / "a.tif", tiny_ckpt, *flags))
        assert res.returncode != 0 and message in res.stderr, res.stderr
        assert "Traceback" not in res.stderr, res.stderr

    res = _run(_cmd(tmp_path / "a.tif", str(partial), "--from", SLIDE, "--start-stage", "3"))
    assert res.returncode != 0 and "missing model file stage3_level1.pt" in res.stderr
    res = _run(_cmd(tmp_path / "b.tif", str(partial), "--from", SLIDE, "--start-stage",
                    "2", "--stages", "2"))
    assert res.returncode == 0, res.stderr[-1500:]  # stage 3's models are not needed there


@pytest.mark.slow
def test_many_slides_manifest_and_resume(tmp_path, tiny_ckpt):
    """--slides 3: a kill during the third slide; the rerun skips the first two and finishes the
    third, bit-identical to a slide made alone."""
    alone = tmp_path / "alone.tif"
    assert _run(_cmd(alone, tiny_ckpt, "--seed", "2", "--order", "raster")).returncode == 0
    cmd = _cmd(tmp_path / "many.tif", tiny_ckpt, "--slides", "3", "--order", "raster")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=_env())
    wrote = 0
    for line in proc.stderr:
        wrote += line.startswith("wrote ")
        if wrote == 2 and line.startswith("stage 3: 5/16"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert not (tmp_path / "many_s2.tif").exists() and (tmp_path / "many_s1.tif").exists()
    res = _run(cmd)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.count("done already, skipped") == 2 and "stage 3: 6/16" in res.stderr
    assert (tmp_path / "many_s2.tif").read_bytes() == alone.read_bytes()
    import json
    manifest = json.load(open(str(tmp_path / "many.tif") + ".manifest.json"))
    assert [m["seed"] for m in manifest] == [0, 1, 2]
    assert all(len(m["sha256"]) == 64 for m in manifest)
    assert manifest[2]["patches"]["3"] == 16 and manifest[2]["settings"]["seed"] == 2
    import socket  # each machine keeps the slides it made; the manifest says which machine
    assert all(m["host"] == socket.gethostname() and m["rank"] == 0 for m in manifest)


@pytest.mark.slow
def test_sample_slide_equals_generate(tmp_path, monkeypatch):
    """sample.py's teaching path (sample_slide: one process, in memory) and its operational one
    (generate: files, journal, ranks) give the same pixels at every stage, bit for bit: the demo's
    geometry (256 / 704 / 2048 px) with tiny random U-Nets."""
    import dataclasses

    import torch

    import sample
    import unet
    demo = cascade.get_preset("demo")
    monkeypatch.setitem(unet.CONFIGS, "flat", unet.UNetConfig(width=8, mults=(1, 2), blocks=1,
                                                              attn=(False, False), groups=4))
    p = dataclasses.replace(demo, name="demo_tiny", unets=("flat",) * 3,
                            sampling=dataclasses.replace(demo.sampling, steps=(2, 2, 2)))
    monkeypatch.setitem(cascade.PRESETS, p.name, p)
    for s in (1, 2, 3):
        for lvl in range(3):
            torch.manual_seed(10 * s + lvl)
            net = unet.build(cascade.unet_config(p, s, lvl))
            for prm in net.parameters():
                torch.nn.init.normal_(prm, std=0.03)
            torch.save(checkpoints.model_payload(p, s, lvl, net.cfg, net.state_dict()),
                       tmp_path / checkpoints.model_filename(s, lvl))
    out = tmp_path / "slide.tif"
    sample.main(["--preset", p.name, "--ckpt", str(tmp_path), "--out", str(out), "--keep-work",
                 "--compression", "zlib", "--device", "cpu", "--precision", "fp32", "--seed", "3"])
    cdms = {s: checkpoints.load_cdm(str(tmp_path), p, s) for s in (1, 2, 3)}
    images = sample.sample_slide(cdms, p, p.sampling, seed=3)
    for s in (1, 2, 3):
        assert np.array_equal(images[s], np.load(str(out) + f".work/stage{s}.npy")), f"stage {s}"
    assert images[3].shape == (2048, 2048, 3) and images[3].std() > 0


def test_estimate_prints_every_stage_without_models():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--preset", "demo",
                          "--estimate", "--gpus", "3"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines()]
    stage3 = next(r for r in rows if r and r[0] == "3")
    demo = cascade.get_preset("demo")
    assert int(stage3[1]) == demo.n_patches[2] ** 2  # patches
    assert int(stage3[2]) == len(tiler.plan("packed", demo.n_patches[2], 8, world=3))
    assert any(r and r[0] == "slide" for r in rows)


@pytest.mark.parametrize("extra,path", [((), "sample_slide"), (("--stream",), "generate")])
def test_demo_command_runs_sample_slide(tmp_path, monkeypatch, extra, path):
    """`python sample.py --out slide.tif`, the README's demo command, makes its slide with
    sample_slide (the teaching path) and the shipped demo models; --stream (like every flag that
    needs files, ranks or a paper-size slide) takes generate, the streamed path."""
    import sample
    from operations import flags, runs

    class Taken(Exception):
        pass
    dirs, load = [], checkpoints.load_cdm

    def load_cdm(ckpt_dir, *a, **k):
        dirs.append(ckpt_dir)
        return load(ckpt_dir, *a, **k)
    monkeypatch.setattr(checkpoints, "load_cdm", load_cdm)

    def spy(name):
        def taken(*a, **k):
            raise Taken(name, a)
        return taken
    monkeypatch.setattr(sample, "sample_slide", spy("sample_slide"))
    monkeypatch.setattr(runs, "generate", spy("generate"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Taken) as e:
        sample.main(["--out", "slide.tif", *extra])
    assert e.value.args[0] == path
    if path == "sample_slide":
        cdms, preset = e.value.args[1][:2]
        assert preset.name == "demo" and sorted(cdms) == [1, 2, 3]
        assert set(dirs) == {os.path.realpath(flags.DEMO_CKPT)}


@pytest.mark.slow
def test_paper_on_eight_gpus_keeps_them_busy():
    """The paper's slide in packed order on 8 GPUs (--estimate; arithmetic from FLOPs, an A100 at
    40 % of 312 TFLOP/s): stage 3 keeps >= 94 % of rank time busy and the slide takes <= 2.35 h
    (wavefront's rounds of 1 to 23 patches: 84.8 %, 2.6 h)."""
    res = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--preset", "paper",
                          "--estimate", "--gpus", "8"], capture_output=True, text=True,
                         timeout=300, env=_env())
    assert res.returncode == 0, res.stderr
    rows = {r[0]: r for r in (line.split() for line in res.stdout.splitlines()) if r}
    assert rows["3"][2] == "279" and float(rows["3"][3].rstrip("%")) >= 94.0
    assert float(rows["slide"][2]) <= 2.35


# ---------------------------------------------------------------------- a run's last files

def _files(folder):
    """{name: bytes} of the files in a folder (not directories)."""
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, f))}


@pytest.mark.slow
def test_a_kill_as_the_slide_appears_resumes_to_the_same_files(tmp_path, tiny_ckpt):
    """Killed the moment OUT appeared (before its stage images, previews and the removal of
    OUT.work/), a run was stranded: --resume refused ('exists'), --overwrite started over (2.3 h
    of 8 GPUs at paper size), and metrics.py scored the slide without its stage 2 ('MAE 0.0,
    identical'). OUT is now written last: killed then, --resume finishes with the files of the
    uninterrupted run; a generated slide without its stage images is refused by metrics.py."""
    import metrics
    for d in ("ref", "killed"):
        (tmp_path / d).mkdir()
    assert _run(_cmd(tmp_path / "ref" / "s.tif", tiny_ckpt, "--stream")).returncode == 0
    out = str(tmp_path / "killed" / "s.tif")
    killer = ("import os, signal, sys\n"
              f"sys.argv = {['sample.py'] + _cmd(out, tiny_ckpt, '--stream')[2:]!r}\n"
              "real = os.replace\n"
              "def replace(src, dst):\n"
              "    real(src, dst)\n"
              f"    if dst == {out!r}:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "os.replace = replace\n"
              "import sample\n"
              "sample.main()\n")
    assert _run([sys.executable, "-c", killer], cwd=ROOT).returncode == -9
    assert os.path.isdir(out + ".work") and _files(tmp_path / "killed") == _files(tmp_path / "ref")
    res = _run(_cmd(out, tiny_ckpt, "--stream", "--resume"))
    assert res.returncode == 0 and "is complete" in res.stderr, res.stderr[-1500:]
    assert not os.path.exists(out + ".work")
    assert _files(tmp_path / "killed") == _files(tmp_path / "ref")
    os.remove(out + ".stage2.png")
    with pytest.raises(SystemExit, match=r"a slide sample.py made, without .*s.tif.stage2.png"):
        metrics.main(["--real", out, "--fake", out, "--preset", "tiny", "--n", "4",
                      "--json", str(tmp_path / "m.json"), "--cache", ""])


def test_the_in_memory_slide_on_a_full_disk_says_it_is_lost(tmp_path, tiny_ckpt, monkeypatch):
    """The in-memory demo path failed its final write with 'nothing written was lost (resume with
    --resume ...)', but it keeps no OUT.work/: every pixel was lost and --resume could not help."""
    import sample
    from operations import runs

    def full(path, *a, **k):
        raise OSError(28, "No space left on device", path)
    monkeypatch.setattr(runs, "write_aperio", full)
    out = tmp_path / "s.tif"
    with pytest.raises(SystemExit, match="made in memory and is lost .no OUT.work/"):
        runs.one_line_errors(sample.main, _cmd(out, tiny_ckpt)[2:])
    assert not out.exists() and not os.path.exists(str(out) + ".work")


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



@pytest.mark.slow
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



def test_nonfinite_patch_stops_sampling_loudly(tmp_path):
    """Weights that are finite but overflow the activations: the run ends with one line, no
    slide."""
    d = tmp_path / "ck"
    d.mkdir()
    save_tiny_models(d, std=300.0)
    res = _cli(os.path.join(ROOT, "sample.py"), *_argv(tmp_path / "s.tif", str(d), "--stages", "1"))
    assert _one_line_error(res) and "non-finite pixels" in res.stderr, res.stderr[-1500:]
    assert not (tmp_path / "s.tif").exists()



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



@pytest.mark.slow
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



@pytest.mark.slow
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



def test_work_directory_without_finished_patches_does_not_block(tmp_path, tiny_ckpt):
    out = tmp_path / "s.tif"
    os.makedirs(str(out) + ".work")
    files.write_json(str(out) + ".work/journal.json", {"settings": {}, "done": {}, "filled": {}})
    res = _cli(os.path.join(ROOT, "sample.py"), *_argv(out, tiny_ckpt, "--stages", "1"))
    assert res.returncode == 0, res.stderr[-1500:]



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



@pytest.mark.slow
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



@pytest.mark.slow
def test_torchrun_takes_the_many_slides_flag(tmp_path):
    """`torchrun ... sample.py --n 2` failed in torchrun's own parser (--n: --nnodes?); the flag is
    --slides, its one spelling (--n is refused in one line, without torchrun too)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port=29593", os.path.join(ROOT, "sample.py"), "--preset", "tiny",
           "--dry-run", "--out", str(tmp_path / "s.tif"), "--slides", "2"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, torchrun_failure(res.stderr)
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".tif")) == ["s_s0.tif",
                                                                           "s_s1.tif"]
    res = _sample("--preset", "tiny", "--dry-run", "--out", tmp_path / "n.tif", "--n", "1")
    assert _one_line_error(res, "--n")
    assert not os.path.exists(tmp_path / "n_s0.tif")



@pytest.mark.slow
def test_ctrl_c_ends_a_run_with_one_line(tmp_path):
    """SIGINT printed a KeyboardInterrupt traceback (28 lines in memory, 39 streamed); nothing is
    damaged, and now it says so in one line, and --resume continues the streamed run."""
    out = tmp_path / "s.tif"
    cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--preset", "demo", "--dry-run",
           "--out", str(out), "--stream", "--batch", "1"]
    # A background job of a non-interactive shell (CI run with &) inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler: the child gets the default disposition.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stderr:  # interrupted inside stage 2, after its first round
        if line.startswith("stage 2:"):
            break
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) != 0 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: interrupted (Ctrl-C); nothing written")
    res = _run(cmd + ["--resume"])
    assert res.returncode == 0 and out.exists(), res.stderr[-1500:]


@pytest.mark.slow
def test_a_refusal_on_rank_0_alone_is_one_line_on_every_rank(tmp_path):
    """Under torchrun an error met by rank 0 alone (--out exists; it alone reads the files) left
    rank 1 in a gloo 'Connection closed by peer' traceback: 71 lines for a one-line error. Now
    every rank ends with rank 0's line (then torchrun's own report, with its launcher's frames), no
    frame of ours and no gloo error; --resume of a finished slide says it is complete."""
    out = tmp_path / "s.tif"
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--master_port=29597", os.path.join(ROOT, "sample.py"), "--preset", "tiny",
            "--dry-run", "--out", str(out)]
    assert _run(base).returncode == 0
    res = _run(base)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert res.returncode != 0 and f'File "{ROOT}' not in res.stderr, res.stderr[-3000:]
    assert "closed by peer" not in res.stderr, res.stderr[-3000:]
    assert len(errors) == 2 and all("exists; pass --overwrite" in e for e in errors), errors
    res = _run(base + ["--resume"])
    assert res.returncode == 0 and "is complete; nothing to resume" in res.stderr, res.stderr
