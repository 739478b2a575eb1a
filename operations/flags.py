"""Flags: one way to check them (a range table per command, one line for the first bad one) and
one way to end a command on bad input (fail: one line naming the flag or file and the fix)."""
import argparse
import math
import os
import sys

# sample.py's default models: the demo's distilled students (docs/distillation.md); their teachers,
# the demo as trained, are one flag away (--ckpt checkpoints/demo)
DEMO_CKPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "checkpoints", "demo_distilled")


def fail(msg):
    """End the command with one line: 'error: ' and msg (name the flag or file, and the fix)."""
    sys.exit(f"error: {msg}")


class Parser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a bad choice, a value that is not a number) are one
    line, like every other error of the project, instead of the usage and a line; its int and
    float flags take ASCII digits only (Python's int() would read '١' as 1)."""

    def __init__(self, doc):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        for kind in (int, float):
            self.register("type", kind, _ascii(kind))

    def error(self, message):
        fail(f"{message.removeprefix('argument ')} (see --help)")


def _ascii(kind):
    def parse(text):
        if not text.isascii():
            raise ValueError(f"{text!r} is not written in ASCII digits")
        return kind(text)
    parse.__name__ = kind.__name__  # argparse's message: "invalid int value: ..."
    return parse


def _finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


def at_least(lo):
    return lambda v: _finite(v) and v >= lo, f"a value >= {lo}"


def above(lo):
    return lambda v: _finite(v) and v > lo, f"a value > {lo}"


def between(lo, hi):
    return lambda v: _finite(v) and lo <= v <= hi, f"a value in [{lo}, {hi}]"


SEED_MAX = 2 ** 63 - 1  # seeds: numpy's generators take non-negative integers
COUNT_MAX = 10 ** 9     # step counts and intervals: 5000 times the paper's 200k steps


def seed():
    return between(0, SEED_MAX)[0], "a whole number from 0 to 2^63 - 1"


def count(lo, hi, what=""):
    """A whole number in [lo, hi]; `what` says where hi comes from."""
    return (lambda v: _finite(v) and lo <= v <= hi,
            f"a value from {lo} to {hi}" + (f" ({what})" if what else ""))


def cores():
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def memory_bytes(device):
    """The memory a step may use: the GPU's on CUDA, else the machine's RAM."""
    import torch
    if getattr(device, "type", device) == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def one_line(fn, interrupted, *a):
    """Run a command's fn(*a); Ctrl-C ends it with one line (`interrupted`: what is kept)."""
    try:
        return fn(*a)
    except KeyboardInterrupt:
        fail(f"interrupted (Ctrl-C); {interrupted}")


def check_ranges(args, rules):
    """rules: {flag: (ok(value) -> bool, rule text)}, e.g. {'--batch': at_least(1)}. A flag left
    unset (None) is not checked; a list is checked value by value. One line for the first flag
    that fails: 'error: --batch 0: use a value >= 1'."""
    for flag, (ok, rule) in rules.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        values = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and not all(ok(v) for v in values):
            fail(f"{flag} {value}: use {rule}")

