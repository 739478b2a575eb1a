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
from operations import checkpoints, costs, flags, previews, recipes, settings, training
from operations.distributed import PRECISION_HELP, init_distributed
from operations.logs import TrainLog
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
    distill: str = None        # progressive distillation [PD]: the teachers' model directory
    distill_steps: int = None  # the first round's student steps (the teacher takes twice as many)
    rounds: int = 1            # distillation rounds, each halving the steps


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


@dataclasses.dataclass(frozen=True)
class Distill:
    """One round of progressive distillation [PD]: the teacher's model file, the student's
    denoising steps (the teacher takes twice as many) and the round's number (1 = from the
    undistilled model). The student's model file records it (`record`): sampling then runs the
    student with DDIM at `steps` (operations/settings.py)."""
    teacher: str
    steps: int
    round: int = 1

    def record(self, teacher_sha256=None):
        return {"steps": self.steps, "sampler": "ddim", "teacher_steps": 2 * self.steps,
                "round": self.round, "teacher": os.path.basename(self.teacher),
                "teacher_sha256": teacher_sha256}


class Trainer:
    """One model: its weights, EMA, optimiser, data position and log.
    rank / world: this process's place in the model's data-parallel group (a group of one when
    each rank trains its own model); ddp: whether gradients are averaged across the group;
    distill: None, or a Distill round (the model is then a student, starting as its teacher)."""

    def __init__(self, cfg, preset, stage, level, rank, world, ddp, device, mpp=None,
                 distill=None):
        self.cfg, self.preset, self.stage, self.level, self.mpp = cfg, preset, stage, level, mpp
        self.rank, self.world, self.ddp, self.device = rank, world, ddp, device
        self.unet_cfg = cascade.unet_config(preset, stage, level, cfg.conditioned)
        self.schedule, self.objective = preset.schedules[level], preset.objectives[level]
        self.path = os.path.join(cfg.out, checkpoints.model_filename(stage, level))
        os.makedirs(cfg.out, exist_ok=True)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = unet_mod.build(self.unet_cfg).to(device, memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))  # Imagen
        self.step, self.position, self.nonfinite_total = 0, 0, 0
        self.max_steps = cfg.max_steps[level]
        self.distill, self.teacher = distill, None
        if distill:  # the frozen teacher; a new student starts as a copy of it [PD]
            self.teacher = checkpoints.load_teacher(self, distill)
        if os.path.exists(self.path):
            checkpoints.resume(self)
        elif distill or cfg.init:
            checkpoints.start_from(self, distill.teacher if distill else os.path.join(
                cfg.init, checkpoints.model_filename(stage, level)), fresh=bool(distill))
        self.log = TrainLog(self.path[:-3] + ".log.jsonl", self.step) if rank == 0 else None
        self.net = self.model
        if ddp:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            self.net = torch.compile(self.net)

    def losses(self, batch, g, net=None):
        """Per-sample losses (B,) and their times t (B,) on one batch: the diffusion loss [SDE-v,
        MinSNR], or a student's distillation loss [PD]. net: default the network trained."""
        to = dict(device=self.device, memory_format=torch.channels_last, non_blocking=True)
        x0, cond = batch["x0"].to(**to), batch["cond"].to(**to)  # (B, 3, L, L), (B, C, L, L)
        cond = None if cond.shape[1] == 0 else cond
        tr, sp = self.preset.training, self.preset.sampling
        if self.teacher is None:
            # Conditioning augmentation: t_aug ~ U(lo, hi), per sample or one a batch [CDM, Imagen].
            t_aug = tr.aug_train[0] + (tr.aug_train[1] - tr.aug_train[0]) * sde.rand(
                1 if tr.aug_per_batch else x0.shape[0], g)
            t_aug = t_aug.expand(x0.shape[0])
        else:  # a student learns the level as it will sample it: at sampling's augmentation
            t_aug = sp.aug_level
        cond, aug_lam = cascade.augment(self.preset, self.stage, self.level, cond, t_aug, g,
                                        self.cfg.conditioned)
        model = lambda net, ends="clamped": cascade.denoiser(net, self.schedule, cond, aug_lam,
                                                             self.cfg.bf16, ends)
        if self.teacher is None:
            # The diffusion loss of the level's objective (v or eps), min-SNR weighted if set.
            return sde.loss_fn(model(net or self.net), x0, schedule=self.schedule,
                               objective=self.objective, min_snr_gamma=tr.min_snr_gamma,
                               generator=g)
        # One student DDIM step where two of the teacher's land [PD Alg. 2], at sampling's ends.
        return sde.distill_loss(model(net or self.net, sp.ends), model(self.teacher, sp.ends), x0,
                                steps=self.distill.steps, schedule=self.schedule,
                                objective=self.objective, threshold=sp.threshold, ends=sp.ends,
                                generator=g)

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
        upkeep = training.Upkeep(self, ds, stop_flag)  # logs, validation, saving, stops
        batches = upkeep.batches(self.loader(ds))  # a corrupt tile's example is drawn again
        while self.step < self.max_steps:
            # Batch: this rank's share of the global batch; its randomness drawn on the device
            # from a generator seeded by (seed, step, rank): no copy, no host sync.
            batch = next(batches)
            seed = sde.derive_seed(self.cfg.seed, self.stage, self.level, self.step, self.rank)
            torch.manual_seed(seed)  # dropout
            losses, t = self.losses(batch, torch.Generator(self.device).manual_seed(seed))
            # Backward (DDP averages the gradients), clipped at norm 1 [PAPER].
            self.opt.zero_grad(set_to_none=True)
            losses.mean().backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            # Update weights and EMA, unless the gradients are not finite (every rank alike).
            finite = bool(torch.isfinite(grad_norm))  # the step's one host sync
            if finite:
                self.opt.step()
                self.update_ema()
            self.step += 1
            # Log, validate, preview, save, stop (operations/training.py).
            if not upkeep.after_step(losses.detach(), t, grad_norm, finite):
                return False
        return upkeep.finish()

    def loader(self, ds):
        """This rank's batches from the saved data position on, and a line saying what runs."""
        cfg = self.cfg
        training.start_line(self, costs.count_params(self.unet_cfg), ds)
        return iter(torch.utils.data.DataLoader(
            ds, batch_sampler=index_lists(self.position, cfg.batch, self.rank, self.world),
            num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
            pin_memory=self.device.type == "cuda"))


def distill_rounds(cfg, stage, level):
    """The Distill rounds of (stage, level) asked by --distill, --distill-steps, --rounds: round r's
    student has steps / 2^(r-1) steps and lives in OUT/steps{K}/; its teacher is the model file in
    --distill, then the round before's student."""
    name = checkpoints.model_filename(stage, level)
    rounds, teacher = [], os.path.join(cfg.distill, name)
    steps = cfg.distill_steps or settings.half_the_teachers_steps(teacher)
    for r in range(1, cfg.rounds + 1):
        rounds.append(Distill(teacher, steps, r))
        teacher, steps = os.path.join(cfg.out, f"steps{steps}", name), steps // 2
    return rounds


def train_models(args):
    """Train the models --stage / --level name on --data: one model data-parallel over all ranks,
    or (several models) the paper's way, one model per rank; with --distill, each model's rounds
    in turn. False if a SIGTERM stopped it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    ddp, rank, world, device = init_distributed(args.device)
    run = settings.training(args, rank, device)  # the flags, resolved and checked, in one call
    preset, models, cfg, slides, mpp = (run.preset, run.models, Config(**run.config), run.slides,
                                        run.mpp)
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
            for distill in distill_rounds(cfg, s, lvl) if cfg.distill else [None]:
                run = dataclasses.replace(cfg, out=os.path.dirname(settings.round_path(
                    cfg, distill, s, lvl)))
                trainer = Trainer(run, preset, s, lvl, group_rank, group_size, sync, device, mpp,
                                  distill)
                if not train_one(trainer, args, slides, stop_flag):
                    break  # stopped by SIGTERM, saved
    except (FloatingPointError, SlideError) as e:  # one line, no traceback
        flags.fail(str(e))
    if ddp:
        dist.destroy_process_group()
    return not stop_flag[0]  # False: stopped by SIGTERM (saved)


def train_one(trainer, args, slides, stop_flag):
    """One model up to --max-steps on its dataset; False if a SIGTERM stopped it."""
    T = trainer
    if T.step >= T.max_steps:
        if T.rank == 0:
            print(f"{T.path}: already at step {T.step} >= --max-steps; nothing to do")
        return True
    ds = data.StageLevelDataset(slides, T.preset, T.stage, T.level, area_size=args.area_size,
                                cache_dir=args.cache, seed=args.seed, length=2 ** 62,
                                conditioned=T.cfg.conditioned, max_open=args.max_open,
                                rank=int(os.environ.get("LOCAL_RANK", 0)),  # the cache build's
                                world=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))  # split
    return T.train(ds, stop_flag)


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
    g = ap.add_argument_group("progressive distillation [Salimans & Ho 2022; docs/distillation.md]")
    g.add_argument("--distill", metavar="TEACHER_DIR", default=None,
                   help="train students of TEACHER_DIR's models: each starts as its teacher and "
                        "learns to take in one DDIM step the teacher's two; students go to "
                        "OUT/steps{K}/ and record K and their sampler (sample.py uses them)")
    g.add_argument("--distill-steps", type=int, default=None, metavar="K",
                   help="the first round's student steps (its teacher takes 2K; default: half "
                        "those a distilled teacher records)")
    g.add_argument("--rounds", type=int, default=1,
                   help="rounds, each halving the steps (K, K/2, ...), each resumable; --export "
                        "then writes the last round's students")
    args = ap.parse_args(argv)
    many, cores = flags.COUNT_MAX, flags.cores()
    flags.check_ranges(args, {
        "--batch": flags.count(1, 10 ** 6), "--lr": flags.above(0), "--ema": (
            lambda v: 0 <= v < 1, "a value in [0, 1)"), "--max-steps": flags.count(0, many),
        "--save-every": flags.count(1, many), "--log-every": flags.count(1, many),
        "--sample-every": flags.count(0, many), "--keep": flags.count(0, 10 ** 4),
        "--sample-steps": flags.count(1, 10 ** 5), "--max-nonfinite": flags.count(1, many),
        "--threads": flags.count(1, cores, "this machine's cores"), "--seed": flags.seed(),
        "--max-open": flags.count(1, 10 ** 6), "--max-unreadable": flags.between(0, 1),
        "--holdout": flags.between(0, 0.5), "--gpu-mem": flags.between(0, 10 ** 5),
        "--min-snr-gamma": flags.between(0, 10 ** 6), "--area-size": flags.count(1, 10 ** 7),
        "--workers": (lambda v: v == "auto" or (v.isascii() and v.isdigit() and int(v) <= cores),
                      f"auto or a whole number from 0 to {cores} (this machine's cores)"),
        "--distill-steps": flags.count(1, 10 ** 5), "--rounds": flags.count(1, 20)})
    if args.gpu_mem <= 0:
        flags.fail(f"--gpu-mem {args.gpu_mem}: use a value above 0")
    settings.check_distill_flags(args)
    if len(args.max_steps) not in (1, 3):
        flags.fail(f"--max-steps {args.max_steps}: use 1 value, or 3 (one per level)")
    if args.recipe:
        recipes.check_recipe_flags(args, ap)
    return settings.train_defaults(args, BUNDLED_SLIDE)


def main(argv=None):
    args = parse_args(argv)
    if args.recipe:
        return recipes.run_recipe(args, parse_args, train_models)
    if args.plot:
        path = previews.plot_curves(args.plot)
        return print(f"wrote {path}") if path else flags.fail(
            f"--plot {args.plot}: no stage*_level*.log.jsonl files (train a model there first)")
    if args.export:
        return checkpoints.export(settings.export_sources(args), args.export)
    if args.memory:
        return costs.print_memory(args)
    return train_models(args)


if __name__ == "__main__":
    flags.one_line(main, "every checkpoint written is kept (--save-every); the same command "
                   "resumes from the last")
