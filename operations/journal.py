"""A sampling run's journal: OUT.work/journal.json holds the run's settings and its finished
patches, so that --resume continues a stopped run to the same slide; the work directory's lock."""
import dataclasses
import fcntl
import json
import os
import shutil
import sys

import numpy as np

import cascade
from operations.aperio import DiskArray
from operations.distributed import barrier, broadcast, on_rank0
from operations.files import atomic_path, write_json
from operations.flags import fail


def json_plain(settings):
    """A settings dataclass as plain JSON types (what the journal holds and compares)."""
    return json.loads(json.dumps(dataclasses.asdict(settings)))


def write_round(canvas, grid, results):
    """A round's patches [((i, j), uint8 (P, P, 3), filled)] into the stage image."""
    for (i, j), pixels, _ in results:
        canvas.write(*grid.origin(i, j), pixels)


class Journal:
    """OUT.work/journal.json: the run's settings and its finished patches, so that --resume
    continues where a run stopped. A round's results are first saved whole (round.npz), then
    written to the stage image, then marked done: a run killed in between re-applies the saved
    round (replay) instead of regenerating from a half-written image."""

    def __init__(self, work, settings):
        self.work = work
        self.path = os.path.join(work, "journal.json")
        self.round_path = os.path.join(work, "round.npz")
        self.state = {"settings": json_plain(settings), "done": {}, "filled": {}, "seconds": {},
                      "model_seconds": {}}

    # what a run has done
    def done(self, stage):
        return [tuple(c) for c in self.state["done"].get(str(stage), [])]

    def filled(self, stage):
        return [tuple(c) for c in self.state["filled"].get(str(stage), [])]

    def stages(self):
        """{stage: (patches, filled, seconds, seconds in the model)} of every stage begun."""
        st = self.state
        return {int(s): (len(st["done"][s]), len(st["filled"].get(s, [])),
                         st["seconds"].get(s, 0.0),
                         st["model_seconds"].get(s, 0.0)) for s in sorted(st["done"])}

    def settings(self):
        return self.state["settings"]

    def has_work(self):
        return any(self.state["done"].values())

    def settings_diff(self, settings):
        """The settings that differ from the journal's: [(name, then, now)]."""
        old, new = self.state["settings"], json_plain(settings)
        return [(k, old.get(k), new[k]) for k in new if old.get(k) != new[k]]

    # saving
    def save(self):
        write_json(self.path, self.state)

    def load(self):
        with open(self.path) as f:
            self.state = json.load(f)

    def share(self, world):
        """Rank 0's state to every rank: only rank 0 reads or writes files, so ranks on other
        machines need no shared file system."""
        self.state = broadcast(self.state, world)

    def stage_round(self, stage, results):
        """Save a round's results before they touch the stage image."""
        cells = np.array([c for c, _, _ in results], np.int64).reshape(-1, 2)
        with atomic_path(self.round_path) as tmp:
            np.savez(tmp, stage=stage, cells=cells, pixels=np.stack([px for _, px, _ in results]),
                     filled=np.array([f for _, _, f in results], bool))

    def pending_round(self):
        """(stage, results) of a round saved but not marked done, or None."""
        if not os.path.exists(self.round_path):
            return None
        z = np.load(self.round_path)
        stage = int(z["stage"])
        if tuple(z["cells"][0]) in self.done(stage):
            return None  # marked done already; the file was left by a kill before its removal
        return stage, [(tuple(map(int, c)), px, bool(f))
                       for c, px, f in zip(z["cells"], z["pixels"], z["filled"])]

    def replay(self, preset):
        """Apply a round saved but not marked done when the last run stopped, as it was."""
        pending = self.pending_round()
        if pending:
            s, results = pending
            canvas = DiskArray(os.path.join(self.work, f"stage{s}.npy"))
            write_round(canvas, cascade.stage_grid(preset, s,
                                                   self.settings()["sampling"]["edge_margin"]),
                        results)
            canvas.flush()  # on disk before the journal says so
            self.mark(s, results, 0.0)
            canvas.close()

    def mark(self, stage, results, seconds, model_seconds=0.0):
        key = str(stage)
        self.state["done"].setdefault(key, []).extend([list(c) for c, _, _ in results])
        self.state["filled"].setdefault(key, []).extend([list(c) for c, _, f in results if f])
        self.state["seconds"][key] = self.state["seconds"].get(key, 0) + seconds
        self.state["model_seconds"][key] = self.state["model_seconds"].get(key, 0) + model_seconds
        self.save()
        if os.path.exists(self.round_path):
            os.remove(self.round_path)


def open_work(args, settings, preset, rank, world):
    """OUT.work/ with its journal, locked for this run (rank 0 holds an exclusive lock; the lock
    file stays open with the journal). A run with finished patches is continued only with --resume
    (first re-applying a round it saved but did not mark) and discarded only with --overwrite; a
    work directory without any finished patch never blocks a fresh start. --resume of a run whose
    OUT is written (stopped while removing OUT.work/) removes OUT.work/ and finishes.
    Returns (work, journal), or (work, None) when the run is already complete."""
    work = args.out + ".work"
    kept = [Journal(work, settings)]  # rank 0's, once prepared

    def prepare():  # rank 0: the files; its one-line errors end every rank (on_rank0)
        journal = kept[0]
        windows = args.window or args.patches
        product = args.out + ".windows.json" if windows else args.out  # what a finished run made
        if os.path.exists(product) and args.resume and not args.overwrite:  # written last
            if not os.path.isdir(work):
                return f"--out {product} is complete; nothing to resume"
            lock_work(work).close()  # not while another run holds it
            shutil.rmtree(work, ignore_errors=True)
            return f"--out {product} is complete (its run stopped while removing {work}/, which " \
                   "is now removed); nothing to resume"
        if os.path.exists(product) and not args.overwrite:
            fail(f"--out {product} exists; pass --overwrite to replace it (or choose another "
                 "--out)")
        os.makedirs(work, exist_ok=True)
        journal.lock = lock_work(work)
        started = os.path.exists(journal.path)
        if started:
            journal.load()
        if started and journal.has_work() and args.resume:
            diff = journal.settings_diff(settings)
            if diff:
                fail("--resume with other settings than the interrupted run "
                     f"({', '.join(k for k, _, _ in diff)}: {[a for _, a, _ in diff]} then, "
                     f"{[b for _, _, b in diff]} now); use the original flags and models, or "
                     "--overwrite")
            journal.replay(preset)
        elif started and journal.has_work() and not args.overwrite:
            fail(f"{work} holds an unfinished run; pass --resume to continue it or --overwrite to "
                 "restart")
        else:
            if args.resume:
                print(f"nothing to resume in {work}; starting afresh", file=sys.stderr)
            for f in os.listdir(work):
                if f != "lock":
                    path = os.path.join(work, f)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            kept[0] = Journal(work, settings)
            kept[0].lock = journal.lock
            kept[0].save()
        return None

    complete = on_rank0(prepare, rank, world)
    if complete:
        if rank == 0:
            print(complete, file=sys.stderr)
        return work, None
    journal = kept[0]
    journal.share(world)
    barrier(world)
    return work, journal


def lock_work(work):
    """An exclusive lock on OUT.work/lock holding this process's pid; a one-line error naming the
    other process when a run holds it. Returns the open file (the lock lasts while it is open)."""
    lock = open(os.path.join(work, "lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        fail(f"{work} is in use by another sample.py run (pid {lock.read().strip() or '?'}); wait "
             "for it or choose another --out")
    lock.seek(0), lock.truncate(), lock.write(str(os.getpid())), lock.flush()
    return lock


