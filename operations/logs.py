"""Progress and logs: the one time-left estimate (ETA), a sampling run's line per round, and a
training run's loss sums, its JSON-lines log and its log lines."""
import hashlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from sde import derive_seed

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


def start_line(trainer, params, ds):
    """A training run's first line (rank 0): the model (params: its parameter count), the batch,
    the steps, the arithmetic, the examples held out from `ds` for the validation loss."""
    T, cfg = trainer, trainer.cfg
    kind = "grid blocks" if ds.blocks is not None else "slides"
    held = (f"{ds.n_val} of {len(ds.examples) + ds.n_val} {kind} held out for a validation loss"
            if ds.n_val else f"no validation loss ({T.preset.training.holdout:.1%} of "
            f"{len(ds.examples)} {kind} rounds to none; --holdout)")
    if T.rank == 0:
        print(f"stage {T.stage} level {T.level}: {params / 1e6:.2f} M params, "
              f"batch {cfg.batch} x {T.world} ranks = global batch {cfg.batch * T.world} at lr "
              f"{cfg.lr:g}, steps {T.step} -> {T.max_steps}, {'bf16' if cfg.bf16 else 'fp32'}, "
              f"{torch.get_num_threads()} threads, {cfg.workers} loader workers; {held}",
              flush=True)


def check_step(trainer, sums, stop_flag):
    """After a training step: on check steps (every min(log_every, 10) steps, the first and the
    last) one collective that adds up the StepSums and the flags of all ranks; on log steps a
    record in the log and a line. Returns (a rank was asked to stop, a rank's data is broken)."""
    T, cfg = trainer, trainer.cfg
    last = T.step in (T.max_steps, sums.step0 + 1)
    if not (T.step % min(cfg.log_every, 10) == 0 or last):
        return False, False
    total = sums.gather(stop_flag[0], T.unreadable.too_many())
    if T.rank == 0 and (T.step % cfg.log_every == 0 or last):
        rec = sums.record(total, T.step, cfg.batch * T.world, T.opt.param_groups[0]["lr"],
                          T.nonfinite_total)
        if getattr(T, "val", None) is not None:
            rec["val_loss"] = validation_loss(T)
        T.log.append(rec)
        val = f" val {rec['val_loss']:.4f}" if "val_loss" in rec else ""
        print(f"stage {T.stage} level {T.level} step {T.step}/{T.max_steps} loss "
              f"{rec['loss']:.4f}{val} {rec['img_per_s']:.1f} img/s {rec['sec_per_step']:.2f} "
              f"s/step non-finite {T.nonfinite_total} {sums.eta.text(T.step)}", flush=True)
    return bool(total[-2] > 0), bool(total[-1] > 0)


@torch.no_grad()
def validation_loss(trainer, n=16):
    """The model's mean loss on n held-out examples (trainer.val: the first n, read once) at noise
    fixed by the seed: the same examples and noise at every log step, so the curve shows the
    model, not the draw; above the training loss, a model that memorises its slides."""
    T = trainer
    if getattr(T, "_val_batch", None) is None:
        items = [T.val[k] for k in range(n)]
        T._val_batch = {key: torch.stack([it[key] for it in items]) for key in ("x0", "cond")}
    g = torch.Generator(T.device).manual_seed(derive_seed(T.cfg.seed, "validation"))
    T.model.eval()  # no dropout
    losses, _ = T.losses(T._val_batch, g, net=T.model)
    T.model.train()
    return float(losses.mean())


class Unreadable:
    """A training run's unreadable examples (a corrupt tile: the dataset draws such an example
    again): each slide's first said on stderr, all counted by slide. Too many (more than `share`
    of the draws, after the first AFTER examples) means broken data, not a bad tile: training saves
    and stops."""
    AFTER = 100

    def __init__(self, rank, share=0.01):
        self.rank, self.share, self.read, self.bad, self.slides = rank, share, 0, 0, {}

    def add(self, whys):
        """A batch's `skipped` texts (data.StageLevelDataset), one per example."""
        self.read += len(whys)
        for why in (line for text in whys for line in text.split("\n") if line):
            self.bad += 1
            slide = why.split(":")[0]
            if slide not in self.slides:
                print(f"rank {self.rank}: an unreadable example, drawn again: {why}; training "
                      f"stops if more than {self.share:.1%} of the draws are unreadable",
                      file=sys.stderr, flush=True)
            self.slides[slide] = self.slides.get(slide, 0) + 1

    def too_many(self):
        return self.read >= self.AFTER and self.bad > self.share * (self.read + self.bad)

    def verdict(self, path, step):
        if not self.too_many():
            return (f"another rank found too many unreadable examples (its line names the "
                    f"slides); {path} saved at step {step}")
        worst = sorted(self.slides, key=self.slides.get, reverse=True)
        return (f"{self.bad} of {self.read + self.bad} draws unreadable (more than "
                f"{self.share:.1%}), from {len(worst)} slide(s): {', '.join(worst[:3])}"
                f"{', ...' if len(worst) > 3 else ''}; {path} saved at step {step}; repair or "
                "remove those slides and run the same command again")


def replica_digest(trainer):
    """--check-replicas: each rank's weight digest, the proof that DDP kept replicas equal."""
    T = trainer
    if T.ddp and T.cfg.check_replicas:
        digest = hashlib.sha1(b"".join(p.detach().cpu().numpy().tobytes()
                                       for p in T.model.parameters()))
        print(f"rank {T.rank}: weights sha1 {digest.hexdigest()}", flush=True)
