"""Train one of the nine URCDM models (a (stage, level) pair), or all of them.

    python train.py --preset demo --stage 2 --level 1 --data SLIDES_DIR --out CKPT_DIR
    torchrun --nproc_per_node=9 train.py --stage 3 --level 0 --data ... --out ...  # data-parallel
    torchrun --nproc_per_node=9 train.py --stage all --level all ...  # one model a rank (paper)
    python train.py --plot CKPT_DIR                                   # the nine loss curves
    python train.py --recipe checkpoints/demo/recipe.txt --data SLIDE --out runs/demo  # the demo

Read `Trainer`: `losses` (one batch's diffusion loss with conditioning augmentation),
`update_ema` and `train` (the loop) are the algorithm; `train_models` runs it for the models asked
for. Checkpoints, logs, previews, flags and memory plans live in operations/.

Re-running the same command resumes from CKPT_DIR/stage{s}_level{l}.pt. Randomness is derived
from (seed, step, rank) and the data position is saved, so a resumed run continues exactly
where it stopped (on CPU: bit-identical weights to an uninterrupted run). Each model logs to
CKPT_DIR/stage{s}_level{l}.log.jsonl (one JSON object per logged step).

References
  [PAPER]   Cechnicka et al., URCDM, MICCAI 2024 (clipping at 1, v-parametrisation, 200k steps).
  [Imagen]  Saharia et al., 2022 (Adam lr 1e-4, betas (0.9, 0.99); conditioning augmentation).
  [SDE-v]   Salimans & Ho, 2022 (v-prediction loss).  [nanoGPT] the torchrun / DDP skeleton.
"""
import copy
import dataclasses
import os
import signal

import torch
import torch.distributed as dist

import cascade
import data
import sde
import unet as unet_mod
from operations import checkpoints, costs, flags, logs, previews, settings
from operations.distributed import PRECISION_HELP, init_distributed
from operations.logs import StepSums, TrainLog
from operations.slides import SlideError

BUNDLED_SLIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "data",
                             "cmu_small_region.svs")  # a small CC0 H&E slide, the demo's data


@dataclasses.dataclass(frozen=True)
class Config:
    """What training reads, resolved once from the flags (operations.settings.train_fields)."""
    out: str                   # checkpoint directory
    batch: int                 # per process; the global batch is batch x ranks
    lr: float                  # Adam's learning rate [Imagen: 1e-4]
    max_steps: tuple           # total optimiser steps per level (0, 1, 2) [PAPER: 200k]
    ema: float                 # EMA decay beta, reached after the preset's warm-up (ema_decay)
    bf16: bool                 # bf16 autocast of the U-Net (the optimiser state stays fp32)
    seed: int = 0
    conditioned: bool = True   # False: the outpainting baseline (no lower-stage crops)
    init: str = None           # start new models from this directory's model files
    compile: bool = False      # torch.compile the model
    workers: int = 0           # data loader processes
    log_every: int = 50
    save_every: int = 1000
    keep: int = 3              # numbered snapshots kept
    sample_every: int = 0      # preview PNGs (0: none)
    sample_steps: int = 25     # sampling steps of the previews
    max_nonfinite: int = 20    # stop after this many non-finite steps in a row
    max_unreadable: float = 0.01  # stop when more of the draws than this share are unreadable
    check_replicas: bool = False

    @classmethod
    def from_args(cls, args, device):
        return cls(**settings.train_fields(args, device))


def ema_decay(step, beta, warmup):
    """The EMA's decay at optimiser step `step` (0-based), or None: no update this step.
    'ema-pytorch' [the authors: imagen-pytorch's trainer keeps ema-pytorch 0.3.2's defaults]: every
    10th step; a copy of the model (decay 0) up to step 110 (its first update after step 100 copies
    again), then 1 - (1 + (step - 100))^(-2/3), at most beta (0.99971 at 200k steps: the EMA then
    averages the last ~34k steps).
    'fast': every step, min(beta, (1 + step) / (10 + step)) (about 10k steps at beta 0.9999)."""
    if warmup == "fast":  # deviation: the demo's short CPU runs (cascade.PRESETS["demo"])
        return min(beta, (1 + step) / (10 + step))
    if warmup != "ema-pytorch":
        raise ValueError(f"unknown EMA warm-up {warmup!r}; use 'ema-pytorch' or 'fast'")
    if step % 10:
        return None
    return 0.0 if step <= 110 else min(beta, 1 - (1 + step - 100) ** (-2 / 3))


class Trainer:
    """One model: its weights, EMA, optimiser, data position and log.
    rank / world: this process's place in the model's data-parallel group (a group of one when
    each rank trains its own model); ddp: whether gradients are averaged across the group."""

    def __init__(self, cfg, preset, stage, level, rank, world, ddp, device, mpp=None):
        self.cfg, self.preset, self.stage, self.level, self.mpp = cfg, preset, stage, level, mpp
        self.rank, self.world, self.ddp, self.device = rank, world, ddp, device
        self.unet_cfg = cascade.unet_config(preset, stage, level, cfg.conditioned)
        self.schedule, self.objective = preset.schedules[level], preset.objectives[level]
        self.path = os.path.join(cfg.out, checkpoints.model_filename(stage, level))
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = unet_mod.build(self.unet_cfg).to(device, memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))  # Imagen
        self.step, self.position, self.nonfinite_total, self.bad_in_a_row = 0, 0, 0, 0
        self.max_steps = cfg.max_steps[level]
        if os.path.exists(self.path):
            checkpoints.resume(self)
        elif cfg.init:
            checkpoints.start_from(self, os.path.join(cfg.init,
                                                      checkpoints.model_filename(stage, level)))
        self.log = TrainLog(self.path[:-3] + ".log.jsonl", self.step) if rank == 0 else None
        self.unreadable = logs.Unreadable(rank, cfg.max_unreadable)
        self.net = self.model
        if ddp:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            self.net = torch.compile(self.net)

    def losses(self, batch, g, net=None):
        """Per-sample losses (B,) and their times t (B,) on one batch [SDE-v, MinSNR]; net: the
        network (default: the one trained)."""
        to = dict(device=self.device, memory_format=torch.channels_last, non_blocking=True)
        x0, cond = batch["x0"].to(**to), batch["cond"].to(**to)  # (B, 3, L, L), (B, C, L, L)
        cond = None if cond.shape[1] == 0 else cond
        # Conditioning augmentation: t_aug ~ U(lo, hi), per sample or one per batch [CDM, Imagen].
        tr = self.preset.training
        t_aug = tr.aug_train[0] + (tr.aug_train[1] - tr.aug_train[0]) * sde.rand(
            1 if tr.aug_per_batch else x0.shape[0], g)
        cond, aug_lam = cascade.augment(self.preset, self.stage, self.level, cond,
                                        t_aug.expand(x0.shape[0]), g, self.cfg.conditioned)
        # The diffusion loss of the level's objective (v or eps), min-SNR weighted if set.
        fn = cascade.denoiser(net or self.net, self.schedule, cond, aug_lam, self.cfg.bf16)
        return sde.loss_fn(fn, x0, schedule=self.schedule, objective=self.objective,
                           min_snr_gamma=tr.min_snr_gamma, generator=g)

    def update_ema(self):
        """ema <- decay ema + (1 - decay) model at the preset's schedule (ema_decay); all
        parameters in one foreach kernel per group (not one launch per tensor)."""
        decay = ema_decay(self.step, self.cfg.ema, self.preset.training.ema_warmup)
        if decay is None:
            return
        ema, model = list(self.ema.parameters()), list(self.model.parameters())
        with torch.no_grad():
            if decay == 0:
                torch._foreach_copy_(ema, model)
            else:
                torch._foreach_lerp_(ema, model, 1 - decay)
            for e, b in zip(self.ema.buffers(), self.model.buffers()):
                e.copy_(b)

    def train(self, ds, stop_flag):
        """Steps until max_steps; False if a SIGTERM stopped it (after saving)."""
        cfg, G = self.cfg, self.cfg.batch * self.world
        self.val = ds.held_out()  # a validation loss in the log (logs.check_step)
        loader, meter = self.loader(ds), StepSums(self.step, self.max_steps, self.device, self.ddp)
        while self.step < self.max_steps:
            # Forward: the loss of this rank's part of the global batch (randomness drawn on the
            # device from a generator seeded by (seed, step, rank): no copy, no host sync).
            batch = self.next_batch(loader)  # examples with a corrupt tile drawn again, counted
            seed = sde.derive_seed(cfg.seed, self.stage, self.level, self.step, self.rank)
            torch.manual_seed(seed)  # dropout
            losses, t = self.losses(batch, torch.Generator(self.device).manual_seed(seed))
            # Backward, then the update unless the gradients are not finite (DDP averaged them,
            # so every rank skips alike). The norm's check is the step's one host sync.
            self.opt.zero_grad(set_to_none=True)
            losses.mean().backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)  # [PAPER]
            finite = bool(torch.isfinite(grad_norm))
            if finite:
                self.opt.step()
                self.update_ema()
                meter.add(losses.detach(), t, grad_norm)  # sums on the device
            self.count_nonfinite(finite)
            self.step += 1
            self.position += G
            # Log, preview, checkpoint: one collective, on check steps only.
            stopping, broken = logs.check_step(self, meter, stop_flag)
            if self.rank == 0 and cfg.sample_every and self.step % cfg.sample_every == 0:
                previews.training_preview(self, ds)
            if self.step % cfg.save_every == 0 or self.step == self.max_steps or stopping or broken:
                checkpoints.save(self)
            if broken:  # too many unreadable examples: the data, not a tile
                raise SlideError(self.unreadable.verdict(self.path, self.step))
            if stopping:
                if self.rank == 0:
                    print(f"stopped by signal at step {self.step}; checkpoint saved to {self.path}",
                          flush=True)
                return False
        logs.replica_digest(self)
        return True

    def next_batch(self, loader):
        """The loader's next batch, its unreadable draws counted (logs.Unreadable). An example
        unreadable draw after draw stops training, a checkpoint saved first."""
        try:
            batch = next(loader)
        except SlideError as e:
            checkpoints.save(self)
            raise SlideError(f"{e}; {self.path} saved at step {self.step}") from None
        self.unreadable.add(batch["skipped"])
        return batch

    def count_nonfinite(self, finite):
        """Non-finite losses or gradients skip the step on every rank together (DDP needs all
        ranks to step alike); too many in a row stop training with the last good checkpoint kept."""
        self.bad_in_a_row = 0 if finite else self.bad_in_a_row + 1
        self.nonfinite_total += not finite
        if self.bad_in_a_row >= self.cfg.max_nonfinite:
            raise FloatingPointError(f"{self.bad_in_a_row} non-finite losses in a row at step "
                                     f"{self.step}; stopped ({self.path} keeps the last good "
                                     "checkpoint); lower --lr or check the data")

    def loader(self, ds):
        """This rank's batches from the saved data position on, and a line saying what runs."""
        cfg = self.cfg
        logs.start_line(self, costs.count_params(self.unet_cfg), ds)
        return iter(torch.utils.data.DataLoader(
            ds, batch_sampler=index_lists(self.position, cfg.batch, self.rank, self.world),
            num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
            pin_memory=self.device.type == "cuda"))


def train_models(args):
    """Train the models --stage / --level name on --data: one model data-parallel over all ranks,
    or (several models) the paper's way, one model per rank. False if a SIGTERM stopped it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    ddp, rank, world, device = init_distributed(args.device)
    preset, models = settings.train_preset(args), settings.models_to_train(args)
    cfg = Config.from_args(args, device)
    slides, mpp = settings.training_slides(args, preset, rank, device)
    stop_flag = [False]  # preemption (SIGTERM): save, then exit
    signal.signal(signal.SIGTERM, lambda *_: stop_flag.__setitem__(0, True))
    if len(models) == 1:  # one model, data-parallel over all ranks
        jobs, sync = [(models[0], rank, world)], ddp
    else:  # the paper's way: one model per rank, each trained alone (no gradient sync)
        jobs, sync = [(m, 0, 1) for m in models[rank::world]], False
        if rank == 0:
            shares = [f"rank {r}: {models[r::world]}" for r in range(min(world, len(models)))]
            print(f"{len(models)} models on {world} process(es): " + "; ".join(shares), flush=True)
    try:
        for (s, lvl), group_rank, group_size in jobs:
            trainer = Trainer(cfg, preset, s, lvl, group_rank, group_size, sync, device, mpp)
            if trainer.step >= trainer.max_steps:
                if trainer.rank == 0:
                    print(f"{trainer.path}: already at step {trainer.step} >= --max-steps; "
                          "nothing to do")
                continue
            ds = data.StageLevelDataset(slides, preset, s, lvl, area_size=args.area_size,
                                        cache_dir=args.cache, seed=args.seed, length=2 ** 62,
                                        conditioned=cfg.conditioned, max_open=args.max_open,
                                        rank=int(os.environ.get("LOCAL_RANK", 0)),  # the cache
                                        world=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))  # build
            if not trainer.train(ds, stop_flag):
                break
    except (FloatingPointError, SlideError) as e:  # one line, no traceback
        flags.fail(str(e))
    if ddp:
        dist.destroy_process_group()
    return not stop_flag[0]  # False: stopped by SIGTERM (saved)


def index_lists(position, batch, rank, world):
    """This rank's dataset indices, one list per step, from a data position (samples consumed
    by all ranks so far) on: step k takes [pos + rank B, pos + (rank + 1) B) of the global batch."""
    while True:
        yield [position + rank * batch + b for b in range(batch)]
        position += batch * world


def parse_args(argv=None):
    ap = flags.Parser(__doc__)
    ap.add_argument("--preset", default="demo",
                    help=f"geometry, model sizes and recipe: {', '.join(cascade.PRESETS)}")
    ap.add_argument("--stage", default="1", choices=["1", "2", "3", "all"],
                    help="which stage's model(s)")
    ap.add_argument("--level", default="0", choices=["0", "1", "2", "all"],
                    help="which level's model(s)")
    ap.add_argument("--data", default=None,
                    help=f"a slide file or a directory of slides (default: the bundled slide, "
                         f"{settings.shown(BUNDLED_SLIDE)})")
    ap.add_argument("--out", default=None,
                    help="checkpoint directory, stage{s}_level{l}.pt (default: ckpt)")
    ap.add_argument("--batch", type=int, default=8,
                    help="per-process batch; global batch = batch x ranks")
    ap.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate [Imagen]")
    ap.add_argument("--max-steps", type=int, nargs="+", default=[200_000],
                    help="total optimiser steps [PAPER: 200k]; 3 values = one per level (0 1 2)")
    ap.add_argument("--ema", type=float, default=0.9999,
                    help="EMA decay beta, reached after the preset's warm-up (train.ema_decay)")
    ap.add_argument("--save-every", type=int, default=1000,
                    help="checkpoint every N steps (and at the end)")
    ap.add_argument("--keep", type=int, default=3, help="numbered snapshots to keep (0: none)")
    ap.add_argument("--sample-every", type=int, default=0,
                    help="write a preview PNG of EMA samples every N steps (0: off)")
    ap.add_argument("--sample-steps", type=int, default=25,
                    help="sampling steps for those previews")
    ap.add_argument("--log-every", type=int, default=50,
                    help="log the loss every N steps (and at step 1)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help=PRECISION_HELP)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: what torch picks)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the model (the saved one is uncompiled)")
    ap.add_argument("--crop", type=int, default=None,
                    help="side of the top level's random training crops (default: the preset's); "
                         "the level's full size trains on what sampling feeds (README, 'Training')")
    ap.add_argument("--min-snr-gamma", type=float, default=None,
                    help="min-SNR-gamma loss weight (default: the preset's; 0 = off)")
    ap.add_argument("--holdout", type=float, default=None,
                    help="share of the examples (the last grid blocks or slides) held out for a "
                         "validation loss, logged and plotted (default: the preset's, 0.025)")
    ap.add_argument("--positions", default=None, choices=["grid", "area"],
                    help="where stage 2-3 examples are (default: the preset's): the authors' "
                         "tissue 'grid' over the whole slide, or anywhere in the slide's 'area'")
    ap.add_argument("--crop-context", default=None, choices=["whole", "window"],
                    help="what the top level's crops see of the context (default: the preset's): "
                         "the 'whole' context resized onto the crop (imagen-pytorch) or its "
                         "'window'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--outpaint", action="store_true",
                    help="train the outpainting baseline (no lower-stage crops)")
    ap.add_argument("--area-size", type=int, default=None,
                    help="level-0 side of each slide's area (default N3)")
    ap.add_argument("--cache", default=None,
                    help="cache directory of the slides' stage images (default: OUT/cache)")
    ap.add_argument("--workers", default="auto",
                    help="data loader workers per rank (default auto: on CUDA this rank's share "
                         "of the machine's cores less one, on CPU 0)")
    ap.add_argument("--max-open", type=int, default=data.MAX_OPEN,
                    help="slides (and their caches) a loader process keeps open (descriptors: "
                         "about 4 per slide)")
    ap.add_argument("--max-nonfinite", type=int, default=20,
                    help="stop after this many non-finite losses in a row")
    ap.add_argument("--max-unreadable", type=float, default=0.01,
                    help="examples that cannot be read (a corrupt tile) are drawn again, said and "
                         "counted; training saves and stops when more than this share of the "
                         "draws is unreadable (after the first 100 examples)")
    ap.add_argument("--check-replicas", action="store_true",
                    help="print each rank's weight digest at the end (DDP)")
    ap.add_argument("--export", metavar="DIR", default=None,
                    help="do not train: write EMA-only fp16 model files of the --out checkpoints "
                         "into DIR")
    ap.add_argument("--memory", action="store_true",
                    help="do not train: print each model's memory per GPU at --batch and "
                         "--precision (auto: bf16, native on GPUs), and whether it fits --gpu-mem")
    ap.add_argument("--gpu-mem", type=float, default=80, help="GiB of one GPU, for --memory")
    ap.add_argument("--plot", metavar="CKPT_DIR", default=None,
                    help="do not train: draw the loss curves into a PNG")
    ap.add_argument("--init", metavar="DIR", default=None,
                    help="start each new model from DIR's model file (its EMA weights and step; a "
                         "fresh optimiser), e.g. to fine-tune the shipped demo; a checkpoint "
                         "already in --out is resumed instead")
    ap.add_argument("--recipe", default=None, metavar="FILE",
                    help="run a recipe file's phases in order, then --export if given (the shipped "
                         "demo's: checkpoints/demo/recipe.txt)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    args = ap.parse_args(argv)
    flags.check_ranges(args, {
        "--batch": flags.at_least(1), "--lr": flags.above(0), "--max-steps": flags.at_least(0),
        "--ema": (lambda v: 0 <= v < 1, "a value in [0, 1)"), "--save-every": flags.at_least(1),
        "--log-every": flags.at_least(1), "--keep": flags.at_least(0),
        "--sample-steps": flags.at_least(1), "--threads": flags.at_least(1),
        "--max-nonfinite": flags.at_least(1), "--max-open": flags.at_least(1),
        "--max-unreadable": flags.between(0, 1), "--holdout": flags.between(0, 0.5),
        "--gpu-mem": flags.above(0), "--min-snr-gamma": flags.at_least(0),
        "--area-size": flags.at_least(1), "--sample-every": flags.at_least(0),
        "--workers": (lambda v: v == "auto" or (v.isascii() and v.isdigit()),
                      "auto or a whole number >= 0")})
    if len(args.max_steps) not in (1, 3):
        flags.fail(f"--max-steps {args.max_steps}: use 1 value, or 3 (one per level)")
    if args.recipe:
        settings.check_recipe_flags(args, ap)
    return settings.train_defaults(args, BUNDLED_SLIDE)


def main(argv=None):
    args = parse_args(argv)
    if args.recipe:
        return settings.run_recipe(args, parse_args, train_models, checkpoints.export)
    if args.plot:
        path = previews.plot_curves(args.plot)
        return print(f"wrote {path}") if path else flags.fail(
            f"--plot {args.plot}: no stage*_level*.log.jsonl files (train a model there first)")
    if args.export:
        return checkpoints.export(args.out, args.export, settings.models_to_train(args))
    if args.memory:
        return costs.print_memory(args)
    return train_models(args)


if __name__ == "__main__":
    main()
