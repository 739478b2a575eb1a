"""Flags of the three commands (operations/flags.py, operations/settings.py): every value outside
what the slide and the machine allow ends the command with one line naming the flag, before any
work; nothing else is ever a traceback. Run in-process: an uncaught exception fails the test."""
import os

import pytest

import metrics
import sample
import train
from operations import flags

HUGE = "99999999999999999999"  # parses as an int; used to hang, overflow or fill the memory


def error_line(main, argv):
    """The one line `main(argv)` ends with (flags.fail's SystemExit)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("argv,needle", [
    (("--estimate", "--gpus", "0"), "--gpus 0"), (("--estimate", "--gpus", "-8"), "--gpus -8"),
    (("--estimate", "--gpus", HUGE), "the 2116 patches of preset paper's stage 3"),
    (("--estimate", "--mfu", "0"), "--mfu 0.0"), (("--estimate", "--mfu", "nan"), "--mfu nan"),
    (("--estimate", "--mfu", "2"), "--mfu 2.0"), (("--estimate", "--mfu", "-0.4"), "--mfu -0.4"),
    (("--estimate", "--tflops", "0"), "--tflops 0.0"),
    (("--estimate", "--patches", HUGE), "windows of 1024 px the 41344 px slide holds apart"),
    (("--batch", HUGE), "--batch"), (("--batch", "-1"), "--batch -1"),
    (("--white-threshold", "2"), "--white-threshold 2.0"), (("--mpp", "-1"), "--mpp -1.0"),
    (("--resample", "0"), "--resample 0"), (("--resample", HUGE), "--resample"),
    (("--steps", "0", "1", "1"), "--steps"), (("--steps", HUGE, "1", "1"), "--steps"),
    (("--steps", "5", "5"), "--steps [5, 5]: use 3 values (one per level) or 9"),
    (("--threshold", "1.5"), "--threshold 1.5"), (("--aug-level", "-0.1"), "--aug-level -0.1"),
    (("--eta", "5"), "--eta 5.0: use a value in [0, 1]"), (("--eta", "1e20"), "--eta"),
    (("--eta", "inf"), "--eta inf"), (("--seed", "-1"), "--seed -1"),
    (("--seed", HUGE), "--seed"), (("--slides", "0"), "--slides 0"),
    (("--slides", HUGE), "--slides"), (("--n", "2"), "unrecognized arguments: --n"),
    (("--patches", "0"), "--patches 0"), (("--patch-size", "64"), "sizes the --patches"),
    (("--lower-windows",), "--lower-windows"), (("--batch", "²"), "invalid int value"),
    (("--batch", "١"), "invalid int value"),  # int() would take it
])
def test_every_numeric_flag_of_sample_py_is_one_line(tmp_path, argv, needle):
    """sample.py (paper's geometry, stand-in models): --eta 5 made a slide of colour noise, --gpus
    1e20 looped per rank, --slides 1e20 overflowed, --seed -1 and --slides 0 were taken."""
    out = ["--out", str(tmp_path / "x.tif")] if "--estimate" not in argv else []
    msg = error_line(sample.main, ["--preset", "paper", "--dry-run", *out, *argv])
    assert needle in msg, msg
    assert not os.path.exists(tmp_path / "x.tif.work")  # refused before any work


@pytest.mark.parametrize("argv,needle", [
    (("--memory", "--gpu-mem", "nan"), "--gpu-mem nan"), (("--memory", "--gpu-mem", "0"), "0.0"),
    (("--workers", "²"), "--workers ²"), (("--workers", HUGE), "this machine's cores"),
    (("--max-unreadable", "2"), "--max-unreadable 2.0"), (("--batch", "0"), "--batch 0"),
    (("--lr", "-1"), "--lr -1.0"), (("--ema", "1.5"), "--ema 1.5"),
    (("--max-steps", "1", "2"), "--max-steps [1, 2]"), (("--max-steps", HUGE), "--max-steps"),
    (("--seed", "-1"), "--seed -1"), (("--seed", HUGE), "--seed"),
    (("--threads", HUGE), "this machine's cores"), (("--threads", "0"), "--threads 0"),
    (("--save-every", HUGE), "--save-every"), (("--rounds", "3"), "add --distill"),
    (("--distill", "/nonexistent"), "no such directory of teacher model files"),
])
def test_every_numeric_flag_of_train_py_is_one_line(tmp_path, argv, needle):
    msg = error_line(train.main, ["--out", str(tmp_path / "ck"), *argv])
    assert needle in msg, msg


def test_a_batch_beyond_the_machines_memory_is_one_line_at_once(tmp_path):
    """train.py --batch 10^6 grew by 0.4 GB a second and ignored SIGTERM: refused before any work,
    since its first layer alone exceeds this machine's memory; a batch that fits is not."""
    msg = error_line(train.main, ["--out", str(tmp_path / "ck"), "--preset", "paper", "--stage",
                                  "3", "--level", "2", "--batch", str(10 ** 6), "--device", "cpu"])
    assert "holds at least" in msg and "use --batch" in msg, msg


@pytest.mark.parametrize("argv,needle", [
    (("--seed", "-1"), "--seed -1"), (("--fake-seed", "-1"), "--fake-seed -1"),
    (("--n", HUGE), "--n"), (("--k", "0"), "--k 0"),
])
def test_every_numeric_flag_of_metrics_py_is_one_line(tmp_path, argv, needle):
    """metrics.py --seed -1 ended with a line that named no flag."""
    msg = error_line(metrics.main, ["--real", "r", "--fake", "f", *argv])
    assert needle in msg, msg


def test_ctrl_c_is_one_line(capsys):
    """Ctrl-C printed a KeyboardInterrupt traceback (28-39 lines); nothing is damaged."""
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        flags.one_line(interrupted, "nothing written was lost")
    assert str(e.value.code) == "error: interrupted (Ctrl-C); nothing written was lost"
