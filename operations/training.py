"""What surrounds a training step (train.Trainer.train calls it once a step): the loss sums and log
lines, the validation loss, previews, checkpoints, and the stops (SIGTERM, non-finite steps,
broken data), with each rank's weight digest at the end."""
import hashlib
import sys

import torch

import sde
from operations import checkpoints, previews
from operations.logs import StepSums
from operations.slides import SlideError


class Upkeep:
    """A training run's upkeep [EDM's training_loop: status, snapshots and stats after the step].
    batches(loader): the loader's batches, their unreadable draws counted (Unreadable);
    after_step(...): everything a finished step asks for; False when the run must stop (saved)."""

    def __init__(self, trainer, ds, stop_flag):
        T = self.T = trainer
        self.ds, self.stop_flag, self.bad_in_a_row = ds, stop_flag, 0
        T.val = ds.held_out()  # the examples of the validation loss (None: none held out)
        self.sums = StepSums(T.step, T.max_steps, T.device, T.ddp)
        self.unreadable = Unreadable(T.rank, T.cfg.max_unreadable)

    def batches(self, loader):
        """The loader's batches. An example whose slide cannot be read is drawn again by the
        dataset and counted here; one unreadable draw after draw stops training, saved first."""
        while True:
            try:
                batch = next(loader)
            except SlideError as e:
                checkpoints.save(self.T)
                raise SlideError(f"{e}; {self.T.path} saved at step {self.T.step}") from None
            self.unreadable.add(batch["skipped"])
            yield batch

    def after_step(self, losses, t, grad_norm, finite):
        """After optimiser step T.step: sums, log, preview, checkpoint, stops. False: stop now."""
        T, cfg = self.T, self.T.cfg
        T.position += cfg.batch * T.world  # examples of all ranks consumed (the data position)
        if finite:
            self.sums.add(losses, t, grad_norm)  # on the device: no host sync
        self.count_nonfinite(finite)
        stopping, broken = check_step(T, self.sums, self.stop_flag, self.unreadable)
        broken = broken and T.step < T.max_steps  # a finished run is saved and reported instead
        if T.rank == 0 and cfg.sample_every and T.step % cfg.sample_every == 0:
            previews.training_preview(T, self.ds)
        if T.step % cfg.save_every == 0 or T.step == T.max_steps or stopping or broken:
            checkpoints.save(T)
        if broken:  # too many unreadable examples: the data, not a tile
            raise SlideError(self.unreadable.verdict(T.path, T.step))
        if stopping and T.rank == 0:
            print(f"stopped by signal at step {T.step}; checkpoint saved to {T.path}", flush=True)
        return not stopping

    def finish(self):
        """The end of a run: what it skipped (unreadable examples), each rank's weight digest."""
        T = self.T
        if self.unreadable.bad:
            print(f"rank {T.rank}: finished at step {T.step}; {self.unreadable.summary()}",
                  file=sys.stderr, flush=True)
        if T.ddp and T.cfg.check_replicas:  # the proof that DDP kept the replicas equal
            digest = hashlib.sha1(b"".join(p.detach().cpu().numpy().tobytes()
                                           for p in T.model.parameters()))
            print(f"rank {T.rank}: weights sha1 {digest.hexdigest()}", flush=True)
        return True

    def count_nonfinite(self, finite):
        """Non-finite losses or gradients skip the step on every rank together (DDP needs all
        ranks to step alike); too many in a row stop training with the last good checkpoint kept."""
        T = self.T
        self.bad_in_a_row = 0 if finite else self.bad_in_a_row + 1
        T.nonfinite_total += not finite
        if self.bad_in_a_row >= T.cfg.max_nonfinite:
            raise FloatingPointError(f"{self.bad_in_a_row} non-finite losses in a row at step "
                                     f"{T.step}; stopped ({T.path} keeps the last good "
                                     "checkpoint); lower --lr or check the data")


def start_line(trainer, params, ds):
    """A training run's first line (rank 0): the model (params: its parameter count), the batch,
    the steps, the arithmetic, the examples held out from `ds` for the validation loss."""
    T, cfg = trainer, trainer.cfg
    kind = "grid blocks" if ds.blocks is not None else "slides"
    held = (f"{ds.n_val} of {len(ds.examples) + ds.n_val} {kind} held out for a validation loss"
            if ds.n_val else f"no validation loss ({T.preset.training.holdout:.1%} of "
            f"{len(ds.examples)} {kind} rounds to none; --holdout)")
    what = (f"distilling {T.distill.teacher} ({2 * T.distill.steps} steps) into "
            f"{T.distill.steps} steps, round {T.distill.round}; " if T.distill else "")
    if T.rank == 0:
        print(f"stage {T.stage} level {T.level}: {what}{params / 1e6:.2f} M params, "
              f"batch {cfg.batch} x {T.world} ranks = global batch {cfg.batch * T.world} at lr "
              f"{cfg.lr:g}, steps {T.step} -> {T.max_steps}, {'bf16' if cfg.bf16 else 'fp32'}, "
              f"{torch.get_num_threads()} threads, {cfg.workers} loader workers; {held}",
              flush=True)


def check_step(trainer, sums, stop_flag, unreadable):
    """After a training step: on check steps (every min(log_every, 10) steps, the first and the
    last) one collective that adds up the StepSums and the flags of all ranks; on log steps a
    record in the log and a line. Returns (a rank was asked to stop, a rank's data is broken)."""
    T, cfg = trainer, trainer.cfg
    last = T.step in (T.max_steps, sums.step0 + 1)
    if not (T.step % min(cfg.log_every, 10) == 0 or last):
        return False, False
    total = sums.gather(stop_flag[0], unreadable.too_many())
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
    """The model's mean loss (train.Trainer.losses) on n held-out examples (trainer.val: the first
    n, read once) at noise fixed by the seed: the same examples and noise at every log step, so
    the curve shows the model, not the draw; above the training loss, a model that memorises."""
    T = trainer
    if getattr(T, "_val_batch", None) is None:
        items = [T.val[k] for k in range(n)]
        T._val_batch = {key: torch.stack([it[key] for it in items]) for key in ("x0", "cond")}
    g = torch.Generator(T.device).manual_seed(sde.derive_seed(T.cfg.seed, "validation"))
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

    def summary(self):
        worst = sorted(self.slides, key=self.slides.get, reverse=True)
        return (f"{self.bad} of {self.read + self.bad} draws were unreadable, from "
                f"{len(worst)} slide(s): {', '.join(worst[:3])}{', ...' if len(worst) > 3 else ''}")

    def verdict(self, path, step):
        if not self.too_many():
            return (f"another rank found too many unreadable examples (its line names the "
                    f"slides); {path} saved at step {step}")
        return (f"{self.summary()} (more than {self.share:.1%}); {path} saved at step {step}; "
                "repair or remove those slides and run the same command again")
