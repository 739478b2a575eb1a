"""train.py: the three kinds of model, DDP under torchrun, exact resume, faults."""
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch

import cascade
import train
from conftest import (ROOT, SLIDE, cli as _cli, one_line_error as _one_line_error, oracle_net,
                      save_tiny_models, torchrun_failure)
from operations import aperio, checkpoints, distributed, logs, settings
from test_data import synthetic_rgb


def _args(tmp_path, *extra, out="ck"):
    return ["--preset", "tiny", "--data", SLIDE, "--out", str(tmp_path / out), "--cache",
            str(tmp_path / "cache"),
            "--batch", "2", "--log-every", "1", *extra]


@pytest.mark.parametrize("stage,level", [(1, 0), (2, 1), (3, 2)])
def test_few_steps_each_kind(tmp_path, stage, level, capsys):
    train.main(_args(tmp_path, "--stage", str(stage), "--level", str(level), "--max-steps", "3",
                     "--sample-every", "3", "--sample-steps", "2"))
    ck = torch.load(tmp_path / "ck" / checkpoints.model_filename(stage, level), weights_only=True)
    assert ck["step"] == 3 and ck["data_position"] == 6 and ck["stage"] == stage
    assert ck["level"] == level
    assert any(not torch.equal(ck["ema"][k], ck["model"][k]) for k in ck["model"])
    assert os.listdir(tmp_path / "ck" / "samples")
    assert "loss" in capsys.readouterr().out
    path = str(tmp_path / "ck" / checkpoints.model_filename(stage, level))
    net, conditioned = checkpoints.load_unet(path, cascade.get_preset("tiny"), stage, level)
    assert conditioned
    assert net.cfg.cond_ch == cascade.cond_channels(cascade.get_preset("tiny"), stage, level)


def test_resume_equals_straight_run(tmp_path):
    train.main(_args(tmp_path, "--stage", "2", "--level", "0", "--max-steps", "6", out="straight"))
    train.main(_args(tmp_path, "--stage", "2", "--level", "0", "--max-steps", "3", out="resumed"))
    train.main(_args(tmp_path, "--stage", "2", "--level", "0", "--max-steps", "6", out="resumed"))
    a = torch.load(tmp_path / "straight" / "stage2_level0.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "stage2_level0.pt", weights_only=True)
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)


def test_resume_takes_new_lr(tmp_path):
    """A second phase at a lower --lr really runs at it (Adam's saved state would restore the
    old)."""
    train.main(_args(tmp_path, "--stage", "1", "--level", "0", "--max-steps", "1", "--lr", "1e-3"))
    train.main(_args(tmp_path, "--stage", "1", "--level", "0", "--max-steps", "2", "--lr", "1e-5"))
    ck = torch.load(tmp_path / "ck" / "stage1_level0.pt", weights_only=True)
    assert ck["step"] == 2 and [g["lr"] for g in ck["optimizer"]["param_groups"]] == [1e-5]


def test_full_size_phase_after_crops(tmp_path, monkeypatch):
    """--crop: the top level trains on crops, then on its full size (what sampling feeds); the model
    still loads under the preset, whose train_crop is a training choice, not part of the model."""
    sizes, get = [], train.data.StageLevelDataset.__getitem__
    monkeypatch.setattr(train.data.StageLevelDataset, "__getitem__",
                        lambda self, i: (lambda d: sizes.append(tuple(d["x0"].shape[-2:])) or d)(
                            get(self, i)))
    # tiny: 16 px crops of 32
    train.main(_args(tmp_path, "--stage", "1", "--level", "2", "--max-steps", "1"))
    train.main(_args(tmp_path, "--stage", "1", "--level", "2", "--max-steps", "2", "--crop", "32"))
    assert sizes == [(16, 16)] * 2 + [(32, 32)] * 2
    net, _ = checkpoints.load_unet(str(tmp_path / "ck" / "stage1_level2.pt"),
                               cascade.get_preset("tiny"), 1, 2)
    with pytest.raises(SystemExit, match="--crop 12: use a multiple of 8 from 8 to 32"):
        train.main(_args(tmp_path, "--stage", "1", "--level", "2", "--max-steps",
                         "3", "--crop", "12"))


def test_resume_with_other_config_refused(tmp_path):
    train.main(_args(tmp_path, "--stage", "2", "--level", "0", "--max-steps", "1"))
    with pytest.raises(SystemExit,
                       match="cannot be resumed: an outpainting model|cannot be resumed: a "
                             "conditioned model"):
        train.main(_args(tmp_path, "--stage", "2", "--level", "0",
                         "--max-steps", "2", "--outpaint"))


def test_nonfinite_losses_skipped_then_stop(tmp_path, monkeypatch, capsys):
    real = train.Trainer.losses
    bad_steps = {1, 2}

    def losses(self, b, g):
        loss, t = real(self, b, g)
        return loss * (float("nan") if self.step in bad_steps else 1.0), t
    monkeypatch.setattr(train.Trainer, "losses", losses)
    train.main(_args(tmp_path, "--stage", "1", "--level", "0", "--max-steps", "4",
                     "--save-every", "1"))
    path = tmp_path / "ck" / "stage1_level0.pt"
    ck = torch.load(path, weights_only=True)
    assert ck["step"] == 4 and ck["nonfinite_total"] == 2
    bad_steps.update(range(100))
    before = path.read_bytes()
    with pytest.raises(SystemExit, match="error: 3 non-finite losses in a row"):
        train.main(_args(tmp_path, "--stage", "1", "--level", "0", "--max-steps", "10",
                         "--max-nonfinite", "3"))
    assert path.read_bytes() == before  # last good checkpoint intact


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def test_sigterm_saves_and_exits(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"),
           *_args(tmp_path, "--stage", "1", "--level", "0",
                                                                   "--max-steps", "100000")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env())
    for line in proc.stdout:  # wait until it trains
        if "step 3/" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and "stopped by signal" in out
    ck = torch.load(tmp_path / "ck" / "stage1_level0.pt", weights_only=True)
    assert 3 <= ck["step"] < 100000


@pytest.mark.slow
def test_three_rank_torchrun_bf16_replicas_identical(tmp_path):
    """DDP as our users run it on GPUs, bf16 autocast, here with gloo on 3 CPU ranks: every rank
    ends with the same weights."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3",
           "--master_port=29533",
           os.path.join(ROOT, "train.py"),
           *_args(tmp_path, "--stage", "2", "--level", "1", "--max-steps", "3"),
           "--check-replicas", "--precision", "bf16"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode == 0, torchrun_failure(out.stderr)
    sums = re.findall(r"rank (\d): weights sha1 ([0-9a-f]+)", out.stdout)
    assert len(sums) == 3 and len({s for _, s in sums}) == 1, out.stdout
    assert "global batch 6" in out.stdout and "bf16" in out.stdout
    ck = torch.load(tmp_path / "ck" / "stage2_level1.pt", weights_only=True)
    assert ck["step"] == 3 and ck["data_position"] == 18


def test_bf16_training_step_close_to_fp32(tmp_path):
    """The CUDA default, bf16 autocast, on CPU: the same batch's loss in bf16 is finite and within
    5 % of fp32's (bf16 keeps 8 bits of mantissa; GroupNorm and the loss stay fp32); a few
    training steps in bf16 stay finite."""
    p = cascade.get_preset("tiny")
    ds = train.data.StageLevelDataset([SLIDE], p, 2, 1, cache_dir=str(tmp_path / "cache"))
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ("x0", "cond")}
    losses = {}
    for precision in ("fp32", "bf16"):
        args = train.parse_args(_args(tmp_path, "--precision", precision, "--stage", "2",
                                      "--level", "1"))
        cfg = train.Config(**settings.train_fields(args, torch.device("cpu")))
        t = train.Trainer(cfg, p, 2, 1, 0, 1, False, torch.device("cpu"))
        for prm in t.model.parameters():  # a trained-looking model, not zero outputs
            torch.nn.init.normal_(prm, std=0.05, generator=torch.Generator().manual_seed(1))
        losses[precision] = float(t.losses(batch, torch.Generator().manual_seed(0))[0].mean())
    assert np.isfinite(losses["bf16"])
    assert abs(losses["bf16"] - losses["fp32"]) <= 0.05 * losses["fp32"], losses
    train.main(_args(tmp_path, "--stage", "2", "--level", "1", "--max-steps", "3",
                     "--precision", "bf16", out="bf16"))
    recs = logs.read_log(tmp_path / "bf16" / "stage2_level1.log.jsonl")
    assert all(np.isfinite(r["loss"]) for r in recs) and recs[-1]["nonfinite"] == 0


@pytest.mark.slow  # about 70 s on 2 cores (inductor compiles the model): python -m pytest -m slow
def test_compile_trains_a_tiny_model(tmp_path):
    """--compile (torch.compile, inductor) on a tiny model: a step runs and the saved model is
    the plain one. Needs a C++ compiler; said so where there is none."""
    import shutil
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("--compile needs a C++ compiler (g++) for torch.compile on CPU; none here")
    train.main(_args(tmp_path, "--stage", "1", "--level", "0", "--max-steps", "2", "--compile"))
    ck = torch.load(tmp_path / "ck" / "stage1_level0.pt", weights_only=True)
    assert ck["step"] == 2 and not any("_orig_mod" in k for k in ck["model"])


def test_training_and_sampling_share_one_denoiser_and_one_augmentation(tmp_path, monkeypatch):
    """train.py and cascade.CDM (sampling) build the model call and the conditioning augmentation
    through the same two functions, so they cannot drift apart."""
    calls = []
    for name in ("denoiser", "augment"):
        real = getattr(cascade, name)
        monkeypatch.setattr(cascade, name, lambda *a, _r=real, _n=name,
                            **k: (calls.append(_n), _r(*a, **k))[1])
    train.main(_args(tmp_path, "--stage", "2", "--level", "1", "--max-steps", "1"))
    assert set(calls) == {"denoiser", "augment"}
    calls.clear()
    p = cascade.get_preset("tiny")
    cdm = cascade.CDM(p, 2, [oracle_net()] * 3)
    x = torch.zeros(1, 3, 32, 32)
    cdm.sample([torch.Generator().manual_seed(0)], context=x, region=x)
    assert calls.count("denoiser") == 3 and calls.count("augment") == 3


def test_log_survives_a_kill_and_a_resume(tmp_path, monkeypatch):
    """Steps logged after the last save are dropped on resume and logged again: 1..5, once each."""
    real = train.Trainer.losses

    def killed_at_4(self, b, g):
        if self.step == 3:  # step 3 logged, last save at 2
            raise KeyboardInterrupt("simulated kill")
        return real(self, b, g)
    monkeypatch.setattr(train.Trainer, "losses", killed_at_4)
    args = _args(tmp_path, "--stage", "1", "--level", "0", "--save-every", "2", "--keep", "0")
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--max-steps", "5"])
    log = tmp_path / "ck" / "stage1_level0.log.jsonl"
    assert [r["step"] for r in logs.read_log(log)] == [1, 2, 3]
    monkeypatch.setattr(train.Trainer, "losses", real)
    train.main(args + ["--max-steps", "5"])
    recs = logs.read_log(log)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert all(len(r["loss_t_quarters"]) == 4 and r["img_per_s"] > 0 and r["lr"] == 1e-4
               for r in recs)


def test_curves_and_previews(tmp_path):
    for level in ("0", "1"):
        train.main(_args(tmp_path, "--stage", "2", "--level", level, "--max-steps", "3",
                         "--sample-every", "3",
                         "--sample-steps", "2"))
    train.main(["--plot", str(tmp_path / "ck")])
    from PIL import Image
    curves = Image.open(tmp_path / "ck" / "loss_curves.png")
    assert curves.size == (720, 240)
    preview = Image.open(tmp_path / "ck" / "samples" / "stage2_level1_step00000003.png")
    # lowres, context, region, EMA sample, target: 5 columns of 128 px under a 28 px label band
    assert preview.size == (5 * 128, 28 + 4 * 128)
    band = np.asarray(preview)[:28]
    assert (band < 128).any()  # the labels are drawn


@pytest.mark.slow
def test_recipe_runs_its_phases_and_resumes(tmp_path, capsys):
    """--recipe: every phase runs in order, then the export; a second call finds each phase done."""
    recipe = os.path.join(ROOT, "tests", "data", "tiny_recipe.txt")
    argv = ["--recipe", recipe, "--data", SLIDE, "--out", str(tmp_path / "ck"), "--cache",
            str(tmp_path / "cache"),
            "--export", str(tmp_path / "models")]
    train.main(argv)
    out = capsys.readouterr().out
    assert "phase 1/2" in out and "phase 2/2" in out
    load = lambda s, l: torch.load(tmp_path / "ck" / checkpoints.model_filename(s, l),
                                   weights_only=True)

    steps = {(s, l): load(s, l)["step"] for s in (1, 2, 3) for l in (0, 1, 2)}
    assert steps == {k: 3 if k == (1, 2) else 2 for k in steps}
    names = sorted(checkpoints.model_filename(s, l) for s, l in steps)
    assert sorted(os.listdir(tmp_path / "models")) == names

    train.main(argv)
    assert capsys.readouterr().out.count("nothing to do") == 10  # nine in phase 1, one in phase 2
    with pytest.raises(SystemExit, match="tiny_recipe.txt sets its own flags; drop --lr"):
        train.main(argv + ["--lr", "1e-3"])
    with pytest.raises(SystemExit, match="--recipe .*nowhere.txt: No such file"):
        train.main(["--recipe", str(tmp_path / "nowhere.txt"), "--out", str(tmp_path / "ck")])


def test_init_starts_from_another_runs_model_file(tmp_path, capsys):
    """--init DIR: a new model starts from DIR's (exported) EMA weights and step with a fresh
    optimiser; an existing checkpoint in --out is resumed instead; a file of another preset is
    refused."""
    train.main(_args(tmp_path, "--stage", "2", "--level", "1", "--max-steps", "3", out="first"))
    train.main(_args(tmp_path, "--stage", "2", "--level", "1", "--export",
                     str(tmp_path / "models"), out="first"))
    name = checkpoints.model_filename(2, 1)
    exported = torch.load(tmp_path / "models" / name, weights_only=True)["ema"]
    train.main(_args(tmp_path, "--stage", "2", "--level", "1", "--max-steps", "3", "--init",
                     str(tmp_path / "models"),
                     out="second"))
    assert "nothing to do" in capsys.readouterr().out  # it starts at the file's step 3
    train.main(_args(tmp_path, "--stage", "2", "--level", "1", "--max-steps", "4", "--init",
                     str(tmp_path / "models"),
                     "--lr", "1e-12", out="third"))
    ck = torch.load(tmp_path / "third" / name, weights_only=True)
    assert ck["step"] == 4 and ck["data_position"] == 2  # one step taken; the data start afresh
    # a near-zero learning rate: the weights are still the exported ones
    for k, v in exported.items():
        assert torch.allclose(ck["model"][k].float(), v.float(), atol=1e-3), k
    train.main(_args(tmp_path, "--stage", "2", "--level", "1", "--max-steps", "5", "--init",
                     str(tmp_path / "nowhere"),
                     out="third"))  # resumed: --init is not read
    assert torch.load(tmp_path / "third" / name, weights_only=True)["step"] == 5
    with pytest.raises(SystemExit, match=r"--init .*stage2_level1.pt: .*preset"):
        train.main(["--preset", "demo", "--data", SLIDE, "--out", str(tmp_path / "demo"), "--cache",
                    str(tmp_path / "cache"),
                    "--stage", "2", "--level", "1", "--max-steps", "1", "--init",
                    str(tmp_path / "models")])
    with pytest.raises(SystemExit, match=r"--init .*missing model file"):
        train.main(_args(tmp_path, "--stage", "2", "--level", "1", "--max-steps", "1", "--init",
                         str(tmp_path / "nowhere"),
                         out="fourth"))


@pytest.mark.slow
def test_bare_command_starts_training(tmp_path):
    """The project's one-line description, `torchrun --nproc_per_node=N train.py --stage 3 --level
    0`, with no other flags (here 2 CPU ranks, gloo, and a step limit): the bundled slide, ckpt/
    and its cache, each default said at the start."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port=29573", os.path.join(ROOT, "train.py"), "--stage", "3", "--level", "0",
           "--max-steps", "2"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, torchrun_failure(res.stderr)
    assert "defaults: --data " in res.stdout and "cmu_small_region.svs" in res.stdout
    assert "--out ckpt, --cache ckpt/cache" in res.stdout
    assert "global batch 16" in res.stdout  # 8 per process x 2 ranks
    ck = torch.load(tmp_path / "ckpt" / "stage3_level0.pt", weights_only=True)
    assert ck["step"] == 2 and os.listdir(tmp_path / "ckpt" / "cache")


def test_more_ranks_than_gpus_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("RANK", "8")
    monkeypatch.setenv("LOCAL_RANK", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "9")
    with pytest.raises(SystemExit, match="9 processes on a machine with 8 GPUs: pass "
                                         "--nproc_per_node 8 or fewer"):
        distributed.init_distributed()


def test_ema_in_one_foreach_equals_the_per_parameter_update(tmp_path):
    args = train.parse_args(_args(tmp_path, "--stage", "2", "--level", "1"))
    cfg = train.Config(**settings.train_fields(args, torch.device("cpu")))
    t = train.Trainer(cfg, cascade.get_preset("tiny"), 2, 1, 0, 1, False, torch.device("cpu"))
    for prm in t.model.parameters():
        torch.nn.init.normal_(prm)
    t.step = 7
    ref = {k: v.clone() for k, v in t.ema.state_dict().items()}
    decay = min(cfg.ema, (1 + 7) / (10 + 7))
    for k, p in t.model.state_dict().items():
        ref[k].lerp_(p, 1 - decay)
    t.update_ema()
    for k, v in t.ema.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_one_collective_per_check_step_and_none_between(tmp_path, monkeypatch):
    """DDP's step loop: the loss, grad norm, stop and broken-data flags travel in one all_reduce on
    check steps (every min(log_every, 10) steps, the first and the last), none on the others
    (DDP's own gradient averaging aside). torch.distributed is mocked: one process plays a 2-rank
    group."""
    calls = []
    monkeypatch.setattr(train.dist, "all_reduce", lambda t, *a, **k: calls.append(t.numel()))
    args = train.parse_args(_args(tmp_path, "--stage", "1", "--level", "0", "--log-every", "5",
                                  "--max-steps", "23", "--save-every", "100"))
    cfg = train.Config(**settings.train_fields(args, torch.device("cpu")))
    p = cascade.get_preset("tiny")
    os.makedirs(args.out)
    t = train.Trainer(cfg, p, 1, 0, 0, 2, False, torch.device("cpu"))
    t.ddp = True  # the collectives of a data-parallel group, without wrapping the model
    ds = train.data.StageLevelDataset([SLIDE], p, 1, 0, cache_dir=str(tmp_path / "cache"))
    assert t.train(ds, [False])
    checks = [s for s in range(1, 24) if s % 5 == 0 or s in (1, 23)]  # 1, 5, 10, 15, 20, 23
    assert len(calls) == len(checks) and set(calls) == {12}


@pytest.mark.slow
def test_open_files_stay_under_the_descriptor_limit(tmp_path):
    """300 slides (links to one small slide) under a limit of 128 open files, at the default
    --max-open (64 slides: about 256 descriptors) with the 2.5 % hold-out read for the validation
    loss at each log step: training runs to its end, and no process of it ever holds more
    descriptors than its limit, counted at every example (data.open_budget takes the bound from
    the limit, not only from the flag). Seen failing (EMFILE) with the bound from --max-open."""
    from test_data import synthetic_rgb, write_slide
    src = str(tmp_path / "src.svs")
    write_slide(src, synthetic_rgb(200, 200))
    (tmp_path / "slides").mkdir()
    for k in range(300):
        os.symlink(src, tmp_path / "slides" / f"s{k:04d}.svs")
    script = f"""
import os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
sys.path.insert(0, {ROOT!r})
import data, train
peak = [0]
real = data.StageLevelDataset.__getitem__
def counted(self, i):
    item = real(self, i)
    peak[0] = max(peak[0], len(os.listdir("/proc/self/fd")))
    return item
data.StageLevelDataset.__getitem__ = counted
train.main(["--preset", "tiny", "--stage", "3", "--level", "0",
            "--data", {str(tmp_path / "slides")!r}, "--out", {str(tmp_path / "ck")!r},
            "--max-steps", "20", "--batch", "16", "--log-every", "10"])
print("PEAK", peak[0])
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, torchrun_failure(res.stderr)
    assert "8 of 300 slides held out for a validation loss" in res.stdout
    assert "val " in res.stdout.splitlines()[-2]  # the held-out examples were read
    assert int(res.stdout.split("PEAK")[1]) <= 128


def test_read_only_slide_directory(tmp_path, capsys):
    """Shared datasets often sit on read-only storage: nothing is written beside the slides (the
    stage-image cache goes under --out by default, and says where)."""
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(SLIDE, slides / "a.svs")
    os.chmod(slides, 0o555)
    try:
        train.main(["--preset", "tiny", "--stage", "2", "--level", "0", "--data", str(slides),
                    "--out", str(tmp_path / "ck"), "--max-steps", "1", "--batch", "2"])
    finally:
        os.chmod(slides, 0o755)
    assert os.listdir(slides) == ["a.svs"]
    assert os.listdir(tmp_path / "ck" / "cache")
    assert f"into {tmp_path / 'ck' / 'cache'}" in capsys.readouterr().err


def _ema_pytorch_decays(n, beta):
    """The decay of each of n calls of ema-pytorch 0.3.2's EMA.update() at its defaults (the
    authors' trainer): None where it skips the call, 0 where it copies the model (its counter
    logic, and its first update after the copies, which copies again: `initted` is still False)."""
    counter, out, initted = 0, [], False
    for _ in range(n):
        step, counter = counter, counter + 1
        if step % 10:
            out.append(None)
        elif step <= 100:
            out.append(0.0)
        elif not initted:  # a copy, then the moving average of two equal models: a copy
            initted = True
            out.append(0.0)
        else:
            epoch = max(counter - 100 - 1, 0)
            out.append(0.0 if epoch <= 0 else min(max(1 - (1 + epoch) ** (-2 / 3), 0.0), beta))
    return out


def test_ema_schedule_of_the_authors_and_of_the_demo(tmp_path):
    mine = [train.ema_decay(s, 0.9999, "ema-pytorch") for s in range(2000)]
    assert mine == _ema_pytorch_decays(2000, 0.9999)
    assert train.ema_decay(200_000, 0.9999, "ema-pytorch") == pytest.approx(0.99971, abs=1e-5)
    assert train.ema_decay(7, 0.9999, "fast") == (1 + 7) / (10 + 7)
    # the trainer follows its preset: paper's EMA is a copy of the model until step 100
    args = train.parse_args(_args(tmp_path, "--stage", "2", "--level", "1"))
    cfg = train.Config(**settings.train_fields(args, torch.device("cpu")))
    paper_like = dataclasses.replace(cascade.get_preset("tiny"), training=dataclasses.replace(
        cascade.get_preset("tiny").training, ema_warmup="ema-pytorch"))
    t = train.Trainer(cfg, paper_like, 2, 1, 0, 1, False, torch.device("cpu"))
    for prm in t.model.parameters():
        torch.nn.init.normal_(prm)
    before = {k: v.clone() for k, v in t.ema.state_dict().items()}
    t.step = 55  # not a 10th step: no update
    t.update_ema()
    assert all(torch.equal(v, before[k]) for k, v in t.ema.state_dict().items())
    t.step = 60  # a copy
    t.update_ema()
    assert all(torch.equal(v, t.model.state_dict()[k]) for k, v in t.ema.state_dict().items())


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



def test_training_records_the_slides_mpp(tmp_path):
    train.main(["--preset", "tiny", "--data", SLIDE, "--out", str(tmp_path / "ck"), "--cache",
                str(tmp_path / "c"),
                "--batch", "1", "--max-steps", "1", "--stage", "3", "--level", "0", "--keep", "0"])
    ck = torch.load(tmp_path / "ck" / "stage3_level0.pt", weights_only=True)
    assert ck["mpp"] == pytest.approx(0.499) and ck["args"]["lr"] == 1e-4



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



@pytest.mark.slow
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



def test_nothing_fits_says_so(capsys):
    """Where nothing fits, --memory said 'use --batch 0 or less'."""
    import train
    train.main(["--memory", "--preset", "paper", "--stage", "3", "--level", "2", "--gpu-mem", "1"])
    out = capsys.readouterr().out
    assert "not even at batch 1" in out and "--batch 0" not in out



def test_a_finished_run_with_a_corrupt_tile_exits_0_and_says_what_it_skipped(tmp_path, capsys):
    """A run meeting a corrupt tile that completed all its steps exited 1 ('saved at step 25;
    repair or remove those slides...'), and its rerun said 'already at step 25': a script saw a
    failure for a finished model: its last check step found the unreadable share above 1 %. Here
    one step of 100 examples over a 3 x 3 block of corrupt tiles: the first check step (100 read)
    is the last; the run ends as finished (exit 0) and reports what it skipped; the rerun has
    nothing to do. Seen failing (SlideError) before the fix."""
    slide = str(tmp_path / "bad.svs")
    corrupt_slide(slide, {r * 16 + c for r in range(5, 8) for c in range(2, 5)})
    argv = ["--preset", "tiny", "--stage", "3", "--level", "0", "--data", slide, "--area-size",
            "200", "--cache", str(tmp_path / "cache"), "--batch", "100", "--keep", "0",
            "--out", str(tmp_path / "ck"), "--max-steps", "1"]
    assert train.main(argv) is True
    err = capsys.readouterr().err
    assert "finished at step 1" in err and "draws were unreadable, from 1 slide(s)" in err, err
    assert train.main(argv) is True
    assert "already at step 1" in capsys.readouterr().out


def test_distillation_rounds_resume_export_and_sample(tmp_path, tiny_ckpt, capsys):
    """train.py --distill: two rounds (4 -> 2 student steps), each a resumable run in
    OUT/steps{K}/ whose student starts as its teacher; a round stopped halfway resumes to the same
    weights, and a round whose teacher changed since it began is refused; --export writes all
    nine files (the undistilled ones from the teachers), each student recording its steps and
    sampler; sample.py then runs those levels with DDIM at their steps unless told otherwise."""
    import sample
    base = ["--preset", "tiny", "--stage", "2", "--level", "1", "--distill", tiny_ckpt,
            "--distill-steps", "4", "--rounds", "2", "--batch", "2", "--data", SLIDE,
            "--cache", str(tmp_path / "cache"), "--keep", "0", "--log-every", "5"]
    assert train.main(base + ["--out", str(tmp_path / "a"), "--max-steps", "6"])
    stopped = [a if a != "2" or base[i - 1] != "--rounds" else "1" for i, a in enumerate(base)]
    train.main(stopped + ["--out", str(tmp_path / "b"), "--max-steps", "3"])  # round 1 halfway
    train.main(base + ["--out", str(tmp_path / "b"), "--max-steps", "6"])     # resumed, round 2
    for k in (4, 2):
        a, b = (torch.load(tmp_path / d / f"steps{k}" / "stage2_level1.pt", weights_only=True)
                for d in "ab")
        assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"]), k
        assert a["distilled"]["steps"] == k and a["distilled"]["sampler"] == "ddim"
        assert a["distilled"]["teacher_steps"] == 2 * k and a["step"] == 6
    out = capsys.readouterr().out
    assert "distilling" in out and "(8 steps) into 4 steps, round 1" in out
    assert "(4 steps) into 2 steps, round 2" in out
    train.main(["--preset", "tiny", "--stage", "all", "--level", "all", "--distill", tiny_ckpt,
                "--rounds", "2", "--distill-steps", "4", "--out", str(tmp_path / "a"), "--export",
                str(tmp_path / "students")])
    assert sorted(os.listdir(tmp_path / "students")) == sorted(
        checkpoints.model_filename(s, lvl) for s in (1, 2, 3) for lvl in range(3))
    resolve = lambda *flags: settings.resolve(sample.parse_args(
        ["--preset", "tiny", "--ckpt", str(tmp_path / "students"), "--out",
         str(tmp_path / "s.tif"), *flags]), torch.device("cpu"))[0].sampling
    st = resolve()
    assert st.level_steps(2, 1) == 2 and st.level_sampler(2, 1) == "ddim"
    assert st.level_steps(2, 2) == 3 and st.level_sampler(2, 2) == "ancestral"
    told = resolve("--steps", "5", "5", "5")
    assert told.level_steps(2, 1) == 5 and told.level_sampler(2, 1) == "ancestral"
    train.main(stopped + ["--out", str(tmp_path / "b"), "--max-steps", "8"])  # round 1 goes on
    with pytest.raises(SystemExit, match="its teacher .* changed since this round began"):
        train.main(base + ["--out", str(tmp_path / "b"), "--max-steps", "8"])


def test_a_distilled_teacher_takes_twice_its_students_steps(tmp_path, tiny_ckpt):
    """A round's teacher that is itself a student of M steps must be given a student of M / 2."""
    base = ["--preset", "tiny", "--stage", "2", "--level", "1", "--batch", "2", "--data", SLIDE,
            "--cache", str(tmp_path / "cache"), "--keep", "0", "--max-steps", "2"]
    train.main(base + ["--distill", tiny_ckpt, "--distill-steps", "4", "--out",
                       str(tmp_path / "r1"), "--sample-every", "2"])  # a student's preview: DDIM
    assert (tmp_path / "r1" / "steps4" / "samples" / "stage2_level1_step00000002.png").exists()
    with pytest.raises(SystemExit, match="was distilled for 4 steps, so its student takes 2"):
        train.main(base + ["--distill", str(tmp_path / "r1" / "steps4"), "--distill-steps", "3",
                           "--out", str(tmp_path / "r2")])
    train.main(base + ["--distill", str(tmp_path / "r1" / "steps4"), "--out", str(tmp_path / "r2")])
    ck = torch.load(tmp_path / "r2" / "steps2" / "stage2_level1.pt", weights_only=True)
    assert ck["distilled"]["steps"] == 2
