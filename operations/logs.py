"""Progress and logs: the one time-left estimate (ETA), a sampling run's line per round, a
training run's loss sums and its JSON-lines log."""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from operations.files import atomic_path


class ETA:
    """Time left for `total` units of work at the rate since it was made (`done` units were
    finished then): the one estimate of every progress line (sampling, training, caches,
    evaluation)."""

    def __init__(self, total, done=0):
        self.total, self.done0, self.done, self.t0 = total, done, done, time.time()

    def rate(self, done):
        """Units per second since the start."""
        return (done - self.done0) / max(time.time() - self.t0, 1e-9)

    def advance(self, k):
        """k more units done: the text at the new count."""
        self.done += k
        return self.text(self.done)

    def text(self, done):
        rate = self.rate(done)
        return f"ETA {(self.total - done) / rate / 60:.1f} min" if rate > 0 else "ETA -"


class Progress:
    """A sampling stage's line per round on stderr: patches done, generated / filled; the time
    left from the generation rate alone (a filled patch costs next to nothing)."""

    def __init__(self, stage, n_total, n_fill, done=0, filled=0):
        # n_total: the stage's patches to make; n_fill: of those not done yet, how many are glass
        # (filled from below, not generated); done, filled: made already (a resumed run)
        self.stage, self.n_total, self.n_fill = stage, n_total, n_fill
        self.done, self.filled = done, filled
        self.eta = ETA(n_total - filled - n_fill, done - filled)

    @classmethod
    def counting(cls, stage, grid, lower, white):
        """The Progress of a whole stage, counting its glass patches first (white(lower, y0, x0,
        P), tiler.WhiteTest; white None: none)."""
        cells = [(i, j) for i in range(grid.n) for j in range(grid.n)]
        n_fill = sum(white(lower, *grid.origin(*c), grid.patch) for c in cells) if white else 0
        return cls(stage, len(cells), n_fill)

    def update(self, results):
        """After a round: results [((i, j), pixels, filled)]."""
        k_fill = sum(f for _, _, f in results)
        self.done, self.filled, self.n_fill = (self.done + len(results), self.filled + k_fill,
                                               self.n_fill - k_fill)
        generated = self.done - self.filled
        print(f"stage {self.stage}: {self.done}/{self.n_total} patches ({generated} generated, "
              f"{self.filled} filled as glass); left: {self.eta.total - generated} to generate, "
              f"{self.n_fill} to fill; {self.eta.rate(generated):.2f} generated patches/s, "
              f"{self.eta.text(generated)}", file=sys.stderr, flush=True)


class StepSums:
    """A training run's sums since the last log record, kept on the device (adding costs no host
    sync): the loss and the sample count per quarter of t, the gradient norm, the finite steps."""

    def __init__(self, step0, max_steps, device="cpu", ddp=False):
        # ddp: whether the sums are added up across the model's data-parallel ranks
        self.step0, self.t_start, self.device, self.ddp = step0, time.time(), device, ddp
        self.eta = ETA(max_steps, step0)
        self._reset(step0)

    def _reset(self, step):
        self.sums = torch.zeros(10, dtype=torch.float64, device=self.device)
        self.last_step, self.t_last = step, time.time()

    def add(self, losses, t, grad_norm):
        quarter = (t.to(losses.device) * 4).clamp(max=3).long()
        self.sums[0:4].index_add_(0, quarter, losses.double())
        self.sums[4:8].index_add_(0, quarter, torch.ones_like(losses, dtype=torch.float64))
        self.sums[8] += grad_norm.double()
        self.sums[9] += 1

    def gather(self, stop, broken=False):
        """The sums of every rank and their flags added up: one all_reduce (DDP), then on the
        host. Returns a float64 numpy array; its last two entries: the ranks asked to stop
        (SIGTERM), the ranks whose data is broken (Unreadable.too_many)."""
        packed = torch.cat([self.sums, torch.tensor([float(stop), float(broken)],
                                                    dtype=torch.float64, device=self.device)])
        if self.ddp:
            dist.all_reduce(packed)
        return packed.cpu().numpy()

    def record(self, sums, step, global_batch, lr, nonfinite):
        """One log record: the mean loss, the loss per quarter of t (the health of a diffusion
        run: t near 0 is fine detail, t near 1 is layout), lr, grad norm, speed, non-finite."""
        dt, n = time.time() - self.t_last, step - self.last_step
        loss_q, count_q = sums[0:4], sums[4:8]
        rec = {"step": step,
               "loss": float(loss_q.sum() / count_q.sum()) if count_q.sum() else float("nan"),
               "loss_t_quarters": [float(s / c) if c else None for s, c in zip(loss_q, count_q)],
               "lr": lr, "grad_norm": float(sums[8] / sums[9]) if sums[9] else None,
               "img_per_s": n * global_batch / max(dt, 1e-9), "sec_per_step": dt / max(n, 1),
               "nonfinite": nonfinite, "wall_s": time.time() - self.t_start}
        self._reset(step)
        return rec


class TrainLog:
    """A model's log, CKPT_DIR/stage{s}_level{l}.log.jsonl, one JSON object per line. On resume,
    lines past the checkpoint's step (logged after its last save, before a kill) are dropped, so
    the resumed run appends them again once: no step is missing or duplicated."""

    def __init__(self, path, resume_step):
        self.path = path
        if os.path.exists(path):
            with open(path) as f:
                keep = [line for line in f if line.strip() and _json_step(line) is not None
                        and _json_step(line) <= resume_step]
            with atomic_path(path) as tmp, open(tmp, "w") as f:
                f.writelines(keep)

    def append(self, rec):
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _json_step(line):
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None  # a line cut by a kill


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if _json_step(line) is not None]
