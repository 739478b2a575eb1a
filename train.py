"""Train one of the nine URCDM models (a (stage, level) pair), or all of them.

    python train.py --preset demo --stage 2 --level 1 --data SLIDES_DIR --out CKPT_DIR
    torchrun --nproc_per_node=9 train.py --stage 3 --level 0 --data ... --out ...   # data-parallel
    torchrun --nproc_per_node=9 train.py --stage all --level all ...   # one model per rank, as the
    paper python train.py --plot CKPT_DIR                                     # loss curves of the
    nine models python train.py --recipe checkpoints/demo/recipe.txt --data SLIDE --out runs/demo
    # the demo's phases

Read `Trainer` first: `__init__`, `losses` (one batch's diffusion loss with conditioning
augmentation), `update_ema` and `train` (the loop) are the algorithm; `train_models` runs it for
the models asked for. Below them, checkpoints and faults, then the "operations" banner (flags,
logs, previews, recipes, main).

Re-running the same command resumes from CKPT_DIR/stage{s}_level{l}.pt. Randomness is derived
from (seed, step, rank) and the data position is saved, so a resumed run continues exactly
where it stopped (on CPU: bit-identical weights to an uninterrupted run). Each model logs to
CKPT_DIR/stage{s}_level{l}.log.jsonl (one JSON object per logged step).

References
  [PAPER]   Cechnicka et al., URCDM, MICCAI 2024 (clipping at 1, v-parametrisation, 200k steps).
  [Imagen]  Saharia et al., 2022 (Adam lr 1e-4, betas (0.9, 0.99); conditioning augmentation).
  [SDE-v]   Salimans & Ho, 2022 (v-prediction loss).  [nanoGPT] the torchrun / DDP skeleton.
"""
import argparse
import copy
import dataclasses
import glob
import hashlib
import json
import os
import re
import shlex
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont

import cascade
import data
import sde
import unet as unet_mod

BUNDLED_SLIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "data",
                             "cmu_small_region.svs")  # a small CC0 H&E slide, the demo's data


# ---------------------------------------------------------------------- the algorithm

@dataclasses.dataclass(frozen=True)
class Config:
    """What training reads, resolved once from the flags (Config.from_args)."""
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
    check_replicas: bool = False

    @classmethod
    def from_args(cls, args, device):
        steps = args.max_steps * 3 if len(args.max_steps) == 1 else args.max_steps
        workers = auto_workers(device) if args.workers == "auto" else int(args.workers)
        # deviation: the authors trained in fp32; auto = bf16 autocast on CUDA (README)
        bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
        return cls(out=args.out, batch=args.batch, lr=args.lr, max_steps=tuple(steps), ema=args.ema,
                   bf16=bf16, seed=args.seed, conditioned=not args.outpaint, init=args.init,
                   compile=args.compile, workers=workers, log_every=args.log_every,
                   save_every=args.save_every, keep=args.keep, sample_every=args.sample_every,
                   sample_steps=args.sample_steps, max_nonfinite=args.max_nonfinite,
                   check_replicas=args.check_replicas)


def ema_decay(step, beta, warmup):
    """The EMA's decay at optimiser step `step` (0-based), or None: no update this step.
    'ema-pytorch' [the authors: imagen-pytorch's trainer keeps ema-pytorch's defaults]: every 10th
    step; a copy of the model (decay 0) up to step 100, then 1 - (1 + (step - 100))^(-2/3), at
    most beta (0.99971 at 200k steps: the EMA then averages the last ~34k steps).
    'fast': every step, min(beta, (1 + step) / (10 + step)) (about 10k steps at beta 0.9999)."""
    if warmup == "fast":  # deviation: the demo's short CPU runs (cascade.PRESETS["demo"])
        return min(beta, (1 + step) / (10 + step))
    if warmup != "ema-pytorch":
        raise ValueError(f"unknown EMA warm-up {warmup!r}; use 'ema-pytorch' or 'fast'")
    if step % 10:
        return None
    return 0.0 if step <= 100 else min(beta, 1 - (1 + step - 100) ** (-2 / 3))


class Trainer:
    """One model: its weights, EMA, optimiser, data position and log.
    rank / world: this process's place in the model's data-parallel group (a group of one when
    each rank trains its own model); ddp: whether gradients are averaged across the group."""

    def __init__(self, cfg, preset, stage, level, rank, world, ddp, device, mpp=None):
        self.cfg, self.preset, self.stage, self.level, self.mpp = cfg, preset, stage, level, mpp
        self.rank, self.world, self.ddp, self.device = rank, world, ddp, device
        self.unet_cfg = cascade.unet_config(preset, stage, level, cfg.conditioned)
        self.schedule, self.objective = preset.schedules[level], preset.objectives[level]
        self.path = os.path.join(cfg.out, cascade.model_filename(stage, level))
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = unet_mod.build(self.unet_cfg).to(device, memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))  # Imagen
        self.step, self.position, self.nonfinite_total, self.bad_in_a_row = 0, 0, 0, 0
        self.max_steps = cfg.max_steps[level]
        if os.path.exists(self.path):
            self.resume()
        elif cfg.init:
            self.start_from(os.path.join(cfg.init, cascade.model_filename(stage, level)))
        self.log = TrainLog(self.path[:-3] + ".log.jsonl", self.step) if rank == 0 else None
        self.net = self.model
        if ddp:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            self.net = torch.compile(self.net)

    def losses(self, batch, g):
        """Per-sample losses (B,) and their times t (B,) on one batch [SDE-v, MinSNR]."""
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
        fn = cascade.denoiser(self.net, self.schedule, cond, aug_lam, self.cfg.bf16)
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
        loader, meter = self.loader(ds), Meter(self.step, self.device)
        while self.step < self.max_steps:
            # Forward: the loss of this rank's part of the global batch (randomness drawn on the
            # device from a generator seeded by (seed, step, rank): no copy, no host sync).
            batch = next(loader)
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
            stopping = self.log_step(meter, ds, stop_flag)
            if self.step % cfg.save_every == 0 or self.step == self.max_steps or stopping:
                self.save()
            if stopping:
                if self.rank == 0:
                    print(f"stopped by signal at step {self.step}; checkpoint saved to {self.path}",
                          flush=True)
                return False
        self.check_replicas()
        return True

    # ------------------------------------------------------ checkpoints and faults
    def state(self):
        return cascade.model_payload(
            self.preset, self.stage, self.level, self.unet_cfg, self.ema.state_dict(),
            conditioned=self.cfg.conditioned, model=self.model.state_dict(),
            optimizer=self.opt.state_dict(), step=self.step, mpp=self.mpp,
            data_position=self.position, nonfinite_total=self.nonfinite_total, seed=self.cfg.seed,
            args={k: list(v) if isinstance(v, tuple) else v
                  for k, v in dataclasses.asdict(self.cfg).items()})

    def resume(self):
        try:
            ck = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            sys.exit(f"error: {self.path}: not a readable checkpoint ({type(e).__name__}); move it "
                     "away to start afresh")
        why = cascade.checkpoint_mismatch(ck, self.preset, self.stage, self.level,
                                          self.cfg.conditioned)
        if why is None and "model" not in ck:
            why = "EMA weights only (an exported model)"
        if why is None and unet_mod.UNetConfig(**ck["unet_config"]) != self.unet_cfg:
            why = f"another U-Net ({ck['unet_config']}, now {self.unet_cfg.to_dict()})"
        if why is None and ck.get("seed") != self.cfg.seed:
            why = f"seed {ck.get('seed')}, now {self.cfg.seed}"
        if why:
            sys.exit(f"error: {self.path} cannot be resumed: {why}; use another --out or the "
                     "original settings")
        self.model.load_state_dict(ck["model"])
        self.ema.load_state_dict(ck["ema"])
        self.opt.load_state_dict(ck["optimizer"])
        for group in self.opt.param_groups:  # --lr wins over the saved one (a lower-lr phase)
            group["lr"] = self.cfg.lr
        self.step, self.position = ck["step"], ck["data_position"]
        self.nonfinite_total = ck["nonfinite_total"]
        if self.rank == 0:
            print(f"resuming {self.path} at step {self.step}", flush=True)

    def start_from(self, path):
        """Model and EMA from another run's model file (exported or not) and its step; the
        optimiser and the data position start afresh."""
        try:
            net, conditioned = cascade.load_unet(path, self.preset, self.stage, self.level)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: --init {e}")
        if conditioned != self.cfg.conditioned or net.cfg != self.unet_cfg:
            sys.exit(f"error: --init {path}: another U-Net or conditioning than --preset "
                     f"{self.preset.name} trains; pass the preset it was trained with")
        self.model.load_state_dict(net.state_dict())
        self.ema.load_state_dict(net.state_dict())
        self.step = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
        if self.rank == 0:
            print(f"starting from {path} (step {self.step}, its EMA weights; a fresh optimiser)",
                  flush=True)

    def save(self):
        """The checkpoint (temp name, then rename) and a numbered snapshot; broken weights are
        never saved."""
        if self.rank != 0:
            return
        for name, sd in (("weights", self.model.state_dict()),
                         ("EMA weights", self.ema.state_dict())):
            why = cascade.weights_problem(sd)
            if why:
                raise FloatingPointError(f"{name} at step {self.step} are broken ({why}); not "
                                         f"saved, {self.path} keeps the last good state; lower "
                                         "--lr or check the data")
        st = self.state()
        with data.atomic_path(self.path) as tmp:
            torch.save(st, tmp)
        if self.cfg.keep > 0:
            base = self.path[:-3]
            with data.atomic_path(f"{base}.step{self.step:08d}.pt") as tmp:
                torch.save(st, tmp)
            for old in sorted(glob.glob(glob.escape(base) + ".step*.pt"))[:-self.cfg.keep]:
                os.remove(old)


    def count_nonfinite(self, finite):
        """Non-finite losses or gradients skip the step on every rank together (DDP needs all
        ranks to step alike); too many in a row stop training with the last good checkpoint kept."""
        self.bad_in_a_row = 0 if finite else self.bad_in_a_row + 1
        self.nonfinite_total += not finite
        if self.bad_in_a_row >= self.cfg.max_nonfinite:
            raise FloatingPointError(f"{self.bad_in_a_row} non-finite losses in a row at step "
                                     f"{self.step}; stopped ({self.path} keeps the last good "
                                     "checkpoint); lower --lr or check the data")

    # ------------------------------------------------------ data, logs, previews
    def loader(self, ds):
        """This rank's batches from the saved data position on, and a line saying what runs."""
        cfg = self.cfg
        if self.rank == 0:
            print(f"stage {self.stage} level {self.level}: "
                  f"{unet_mod.count_params(self.unet_cfg) / 1e6:.2f} M params, batch {cfg.batch} x "
                  f"{self.world} ranks = global batch {cfg.batch * self.world} at lr {cfg.lr:g}, "
                  f"steps {self.step} -> {self.max_steps}, {'bf16' if cfg.bf16 else 'fp32'}, "
                  f"{torch.get_num_threads()} threads, {cfg.workers} loader workers", flush=True)
        return iter(torch.utils.data.DataLoader(
            ds, batch_sampler=index_lists(self.position, cfg.batch, self.rank, self.world),
            num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
            pin_memory=self.device.type == "cuda"))

    def log_step(self, meter, ds, stop_flag):
        """On check steps (every min(log_every, 10) steps, the first and the last): one collective
        that sums the meter's figures and the stop flags of all ranks; on log steps a record and a
        line; previews. Returns whether a rank was asked to stop (SIGTERM)."""
        cfg, last = self.cfg, self.step in (self.max_steps, meter.step0 + 1)
        if not (self.step % min(cfg.log_every, 10) == 0 or last):
            return False
        sums = meter.gather(stop_flag[0], self.ddp)
        if self.rank == 0 and (self.step % cfg.log_every == 0 or last):
            rec = meter.record(sums, self.step, cfg.batch * self.world,
                               self.opt.param_groups[0]["lr"], self.nonfinite_total)
            self.log.append(rec)
            eta = (self.max_steps - self.step) * rec["sec_per_step"]
            print(f"stage {self.stage} level {self.level} step {self.step}/{self.max_steps} loss "
                  f"{rec['loss']:.4f} {rec['img_per_s']:.1f} img/s {rec['sec_per_step']:.2f} "
                  f"s/step non-finite {self.nonfinite_total} eta {eta / 60:.1f} min", flush=True)
        if self.rank == 0 and cfg.sample_every and self.step % cfg.sample_every == 0:
            write_preview(self, ds)
        return bool(sums[-1] > 0)

    def check_replicas(self):
        """--check-replicas: each rank's weight digest, the proof that DDP kept replicas equal."""
        if self.ddp and self.cfg.check_replicas:
            digest = hashlib.sha1(b"".join(p.detach().cpu().numpy().tobytes()
                                           for p in self.model.parameters()))
            print(f"rank {self.rank}: weights sha1 {digest.hexdigest()}", flush=True)


def train_models(args):
    """Train the models --stage / --level name on --data: one model data-parallel over all ranks,
    or (several models) the paper's way, one model per rank. False if a SIGTERM stopped it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    ddp, rank, world, device = cascade.init_distributed(args.device)
    preset, models, cfg = train_preset(args), models_to_train(args), Config.from_args(args, device)
    os.makedirs(args.out, exist_ok=True)
    if rank == 0 and args.defaulted:
        print("defaults: " + ", ".join(args.defaulted) + " (pass the flags to change them)",
              flush=True)

    try:
        slides = data.list_slides(args.data)
        mpp = slides_mpp(slides, preset, args.region_size)
    except data.SlideError as e:
        sys.exit(f"error: --data {e}")
    if rank == 0:
        remove_orphans(args.out)
    stop_flag = [False]
    # preemption: save, then exit
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
            if trainer.rank == 0 and args.max_steps == [200_000] and device.type == "cpu":
                print("note: --max-steps is left at the paper's 200000 and this runs on a CPU: the "
                      "ETA after step 1 says how long that takes; pass --max-steps for a shorter "
                      "run", flush=True)
            ds = data.StageLevelDataset(slides, preset, s, lvl, region_size=args.region_size,
                                        cache_dir=args.cache, seed=args.seed, length=2 ** 62,
                                        conditioned=cfg.conditioned, max_open=args.max_open,
                                        rank=int(os.environ.get("LOCAL_RANK", 0)),  # the cache
                                        world=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))  # build
            if not trainer.train(ds, stop_flag):
                break
    except (FloatingPointError, data.SlideError) as e:  # one line, no traceback
        sys.exit(f"error: {e}")
    if ddp:
        dist.destroy_process_group()
    return not stop_flag[0]  # False: stopped by SIGTERM (saved)


# ====================================================================== operations
# ---------------------------------------------------------------------- memory plan

class CudaAutocastPolicy(torch.overrides.TorchFunctionMode):
    """CUDA autocast's dtype policy where it cannot run (the meta device, a CPU): the inputs of
    convolutions, linear layers and attention become bf16 (weights through a cast, once a step);
    everything else runs in the dtype it gets (GroupNorm in fp32: unet.GroupNorm32)."""
    LOW = {torch.conv2d, torch.nn.functional.conv2d, torch.nn.functional.linear,
           torch.nn.functional.scaled_dot_product_attention, torch.matmul}

    def __init__(self, weights):
        super().__init__()
        self.weights, self.casts, self.keep = weights, set(), []  # parameters' storages, casts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.LOW:
            def cast(t):
                if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
                    return t
                out = t.to(torch.bfloat16)
                if _storage(t) in self.weights:  # kept alive: no later tensor reuses its address
                    self.casts.add(_storage(out))
                    self.keep.append(out)
                return out
            args = [cast(a) for a in args]
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _storage(t):
    return t.untyped_storage()._cdata


def saved_bytes(cfg, size, bf16=False):
    """(activations, weights) bytes autograd saves for the backward pass of one image through a
    U-Net at size x size, counted on the meta device: each saved storage once (views share one),
    the weights (and their bf16 casts, per step, not per image) apart; bf16: under CUDA
    autocast's policy (CudaAutocastPolicy)."""
    with torch.device("meta"):
        net = unet_mod.build(cfg)
        weights = {_storage(p) for p in net.parameters()}
        policy = CudaAutocastPolicy(weights)
        seen, acts, wts = set(), [0], [0]

        def pack(t):
            key = _storage(t)
            if key not in seen:
                seen.add(key)
                n = t.untyped_storage().nbytes()
                (wts if key in weights or key in policy.casts else acts)[0] += n
            return t
        cond = torch.zeros(1, cfg.cond_ch, size, size) if cfg.cond_ch else None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if bf16:
                with policy:
                    net(torch.zeros(1, 3, size, size), torch.zeros(1), cond, torch.zeros(1))
            else:
                net(torch.zeros(1, 3, size, size), torch.zeros(1), cond, torch.zeros(1))
    return acts[0], wts[0]


def memory_plan(preset, models, batch, bf16, gpu_gib, crop=None):
    """Per model: parameters, the bytes of weights + gradients + Adam + EMA (16 B + 4 B a
    parameter, fp32), activations per image (saved_bytes), the peak per GPU at `batch` and
    whether it fits `gpu_gib`, and the largest batch that does. The peak is an estimate: states +
    batch x activations + the saved weights' casts, with 10 % for the allocator and workspace."""
    rows = []
    for s, lvl in models:
        cfg = cascade.unet_config(preset, s, lvl)
        L = preset.level_sizes[lvl]
        size = min(L, crop or preset.training.crop) if lvl == len(preset.level_sizes) - 1 else L
        n = unet_mod.count_params(cfg)
        states = 20 * n  # fp32 weights, gradients, Adam's two moments, EMA
        act, wts = saved_bytes(cfg, size, bf16)
        peak = lambda b: 1.1 * (states + wts + b * act)
        fit = max(0, int((gpu_gib * 2 ** 30 / 1.1 - states - wts) // act))
        rows.append(dict(stage=s, level=lvl, size=size, params=n, states=states, act=act,
                         peak=peak(batch), fits=peak(batch) <= gpu_gib * 2 ** 30, max_batch=fit))
    return rows


def print_plan(args):
    """train.py --plan: the memory plan of the models asked for, one line each."""
    preset, models = train_preset(args), models_to_train(args)
    bf16 = args.precision != "fp32"
    print(f"memory plan, preset {preset.name}, batch {args.batch} per GPU, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, {args.gpu_mem:g} GiB a GPU:")
    for r in memory_plan(preset, models, args.batch, bf16, args.gpu_mem, args.crop):
        print(f"  stage {r['stage']} level {r['level']} at {r['size']} px: "
              f"{r['params'] / 1e6:.1f} M params, states {r['states'] / 2 ** 30:.1f} GiB, "
              f"activations {r['act'] / 2 ** 30:.2f} GiB an image -> peak "
              f"{r['peak'] / 2 ** 30:.1f} GiB: {'fits' if r['fits'] else 'does NOT fit'}"
              + ("" if r["fits"] else f"; use --batch {r['max_batch']} or less")
              + f" (largest batch that fits: {r['max_batch']})")


# Flags, logs, previews, curves, export, recipes, main: what makes training watchable and
# repeatable. None of it changes a weight.

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo",
                    help=f"geometry, model sizes and recipe: {', '.join(cascade.PRESETS)}")
    ap.add_argument("--stage", default="1", choices=["1", "2", "3", "all"],
                    help="which stage's model(s)")
    ap.add_argument("--level", default="0", choices=["0", "1", "2", "all"],
                    help="which level's model(s)")
    ap.add_argument("--data", default=None,
                    help=f"a slide file or a directory of slides (default: the bundled slide, "
                         f"{_shown(BUNDLED_SLIDE)})")
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
                    help="auto = bf16 autocast on CUDA, fp32 on CPU; bf16 on CPU needs native "
                         "support")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: what torch picks)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the model (the saved one is uncompiled)")
    ap.add_argument("--crop", type=int, default=None,
                    help="side of the top level's random training crops (default: the preset's); "
                         "the level's full size trains on what sampling feeds (README, 'Training')")
    ap.add_argument("--min-snr-gamma", type=float, default=None,
                    help="min-SNR-gamma loss weight (default: the preset's; 0 = off)")
    ap.add_argument("--positions", default=None, choices=["grid", "region"],
                    help="where stage 2-3 examples are (default: the preset's): the authors' "
                         "tissue 'grid' over the whole slide, or anywhere in the 'region'")
    ap.add_argument("--crop-context", default=None, choices=["whole", "window"],
                    help="what the top level's crops see of the context (default: the preset's): "
                         "the 'whole' context resized onto the crop (imagen-pytorch) or its "
                         "'window'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--outpaint", action="store_true",
                    help="train the outpainting baseline (no lower-stage crops)")
    ap.add_argument("--region-size", type=int, default=None,
                    help="level-0 side of each slide's region (default N3)")
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
    ap.add_argument("--check-replicas", action="store_true",
                    help="print each rank's weight digest at the end (DDP)")
    ap.add_argument("--export", metavar="DIR", default=None,
                    help="do not train: write EMA-only fp16 model files of the --out checkpoints "
                         "into DIR")
    ap.add_argument("--plan", action="store_true",
                    help="do not train: print each model's memory per GPU at --batch and "
                         "--precision (auto = bf16), and whether it fits --gpu-mem")
    ap.add_argument("--gpu-mem", type=float, default=80, help="GiB of one GPU, for --plan")
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
    for flag, value, ok in (("--batch", args.batch, args.batch >= 1),
                            ("--lr", args.lr, args.lr > 0),
                            ("--max-steps", args.max_steps,
                             len(args.max_steps) in (1, 3) and min(args.max_steps) >= 0),
                            ("--ema", args.ema, 0 <= args.ema < 1),
                            ("--save-every", args.save_every, args.save_every >= 1),
                            ("--log-every", args.log_every, args.log_every >= 1),
                            ("--keep", args.keep, args.keep >= 0),
                            ("--sample-steps", args.sample_steps, args.sample_steps >= 1),
                            ("--threads", args.threads, args.threads is None or args.threads >= 1),
                            ("--max-nonfinite", args.max_nonfinite, args.max_nonfinite >= 1),
                            ("--max-open", args.max_open, args.max_open >= 1),
                            ("--workers", args.workers,
                             args.workers == "auto" or args.workers.isdigit())):

        if not ok:
            sys.exit(f"error: {flag} {value}: out of range (see --help)")
    if args.recipe:
        extra = [k for k, v in vars(args).items()
                 if k not in RECIPE_FLAGS + ("recipe",) and v != ap.get_default(k)]
        if extra:
            sys.exit(f"error: --recipe {args.recipe} sets its own flags; drop "
                     f"--{extra[0].replace('_', '-')} (only "
                     f"--{', --'.join(f.replace('_', '-') for f in RECIPE_FLAGS)} may be given "
                     "with it)")
    # Defaults that serve the bare `train.py --stage 3 --level 0`, said at the start (defaulted).
    args.defaulted = [f"--{k} {v}" for k, v in (
        ("data", _shown(BUNDLED_SLIDE) if args.data is None else None),
        ("out", "ckpt" if args.out is None else None),
        ("cache", os.path.join(args.out or "ckpt", "cache") if args.cache is None else None)) if v]
    args.data = args.data or BUNDLED_SLIDE
    args.out = args.out or "ckpt"
    args.cache = args.cache or os.path.join(args.out, "cache")
    return args


def auto_workers(device):
    """Loader workers of one rank: on CUDA its share of this machine's cores less one (the rank's
    own process); on CPU none (the step itself uses the cores)."""
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)


def _shown(path):

    """A path as a user would type it here: relative below the working directory, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def models_to_train(args):
    """[(stage, level), ...] from --stage / --level."""
    stages = [1, 2, 3] if args.stage == "all" else [int(args.stage)]
    levels = [0, 1, 2] if args.level == "all" else [int(args.level)]
    return [(s, l) for s in stages for l in levels]


def train_preset(args):
    """The preset with the training flags that override its recipe (--crop, --min-snr-gamma,
    --positions, --crop-context)."""
    preset = cascade.get_preset(args.preset)
    tr = preset.training
    if args.crop is not None:
        top = preset.level_sizes[-1]
        if not (8 <= args.crop <= top and args.crop % 8 == 0):
            sys.exit(f"error: --crop {args.crop}: use a multiple of 8 from 8 to {top} (the top "
                     f"level's size) for preset {preset.name}")
        tr = dataclasses.replace(tr, crop=args.crop)
    if args.min_snr_gamma is not None:
        tr = dataclasses.replace(tr, min_snr_gamma=args.min_snr_gamma or None)
    if args.positions is not None:
        tr = dataclasses.replace(tr, positions=args.positions)
    if args.crop_context is not None:
        tr = dataclasses.replace(tr, crop_context=args.crop_context)
    return dataclasses.replace(preset, training=tr)


def index_lists(position, batch, rank, world):
    """This rank's dataset indices, one list per step, from a data position (samples consumed
    by all ranks so far) on: step k takes [pos + rank B, pos + (rank + 1) B) of the global batch."""
    while True:
        yield [position + rank * batch + b for b in range(batch)]
        position += batch * world


def slides_mpp(slides, preset, region_size):
    """Microns per stage-3 pixel: the slides' level-0 MPP times the region's downsample to N3
    (the median when slides differ; None when no slide says)."""
    mpps = []
    for path in slides:
        with data.open_slide(path) as slide:
            mpps += [slide.mpp] if slide.mpp else []
    if not mpps:
        return None
    N3 = cascade.stage_size(preset, 3)
    return float(np.median(mpps)) * (region_size or N3) / N3


def remove_orphans(out):
    """Temp files of saves that a kill interrupted (their process is gone)."""
    for path in glob.glob(os.path.join(out, "*.tmp*.pt")):
        m = re.search(r"\.tmp(\d+)\.pt$", path)
        if m and not _alive(int(m.group(1))):
            os.remove(path)


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# ---------------------------------------------------------------------- watching a run

class Meter:
    """Sums since the last log record, kept on the device (adding costs no host sync): the loss
    and the sample count per quarter of t, the gradient norm and the finite steps."""

    def __init__(self, step0, device="cpu"):
        self.step0, self.t_start, self.device = step0, time.time(), device
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

    def gather(self, stop, ddp):
        """The sums of every rank and their stop flags added up: one all_reduce (DDP), then on
        the host. Returns a float64 numpy array (the last entry: ranks asked to stop)."""
        packed = torch.cat([self.sums, torch.tensor([float(stop)], dtype=torch.float64,
                                                    device=self.device)])
        if ddp:
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
            with data.atomic_path(path) as tmp, open(tmp, "w") as f:
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


def _label(draw, xy, text, fill=(0, 0, 0)):
    draw.text(xy, text, fill=fill, font=ImageFont.load_default())


@torch.no_grad()
def write_preview(trainer, ds, n=4):
    """CKPT_DIR/samples/stage{s}_level{l}_step{N}.png: one row per fixed held-out item: its
    conditioning inputs, the EMA model's sample and the target, each at >= 128 px, labelled."""
    T, p = trainer, trainer.preset
    items = [ds[10 ** 9 + k] for k in range(n)]
    x0 = torch.stack([it["x0"] for it in items])
    cond = torch.stack([it["cond"] for it in items]).to(T.device)
    cond = None if cond.shape[1] == 0 else cond
    g = torch.Generator().manual_seed(T.cfg.seed)
    cond_in = None if cond is None else cond.cpu().clamp(-1, 1)
    cond, aug_lam = cascade.augment(p, T.stage, T.level, cond, p.sampling.aug_level,
                                    g, T.cfg.conditioned)
    fn = cascade.denoiser(T.ema, T.schedule, cond, aug_lam, T.cfg.bf16)
    x = sde.sample(fn, tuple(x0.shape), steps=T.cfg.sample_steps, schedule=T.schedule,
                   objective=T.objective,
                   generator=g, device=T.device).clamp(-1, 1).cpu()
    n_lower = 0 if cond_in is None else cond_in.shape[1] // 3 - (T.level > 0)
    names = (["lowres"] if T.level > 0 else []) + ["context", "region"][:n_lower]
    cols = (list(cond_in.split(3, dim=1)) if cond_in is not None else []) + [x, x0]
    names += ["EMA sample", "target"]
    side = max(128, x0.shape[-1])
    tiles = [torch.nn.functional.interpolate(c, size=(side, side), mode="nearest") for c in cols]
    rows = cascade.to_uint8(torch.cat(tiles, dim=3))  # (n, side, side * len(cols), 3)
    head = 28
    img = Image.new("RGB", (rows.shape[2], head + n * side), "white")
    img.paste(Image.fromarray(np.concatenate(list(rows))), (0, head))
    draw = ImageDraw.Draw(img)
    _label(draw, (4, 2),
           f"stage {T.stage} level {T.level}, step {T.step}, {T.cfg.sample_steps} sampling steps")
    for k, name in enumerate(names):
        _label(draw, (k * side + 4, 15), name)
    os.makedirs(os.path.join(T.cfg.out, "samples"), exist_ok=True)
    path = os.path.join(T.cfg.out, "samples", f"stage{T.stage}_level{T.level}_step{T.step:08d}.png")
    img.save(path)
    return path


def plot_curves(ckpt_dir, out=None, panel=(360, 240)):
    """CKPT_DIR/loss_curves.png: each model's loss against its step, raw (light) and smoothed
    (EMA over log records, dark), one panel per model, drawn with Pillow (no plotting library
    needed for a few lines)."""
    logs = sorted(glob.glob(os.path.join(ckpt_dir, "stage*_level*.log.jsonl")))
    if not logs:
        sys.exit(f"error: --plot {ckpt_dir}: no stage*_level*.log.jsonl files (train a model there "
                 "first)")
    W, H = panel
    cols = min(3, len(logs))
    img = Image.new("RGB", (cols * W, ((len(logs) + cols - 1) // cols) * H), "white")
    draw = ImageDraw.Draw(img)
    for k, path in enumerate(logs):
        recs = [r for r in read_log(path) if np.isfinite(r.get("loss", float("nan")))]
        ox, oy = (k % cols) * W, (k // cols) * H
        _label(draw, (ox + 6, oy + 4),
               os.path.basename(path).split(".")[0] + f" ({len(recs)} records)")
        if len(recs) < 2:
            continue
        steps = np.array([r["step"] for r in recs], float)
        loss = np.array([r["loss"] for r in recs])
        smooth = np.copy(loss)
        for i in range(1, len(loss)):
            smooth[i] = 0.8 * smooth[i - 1] + 0.2 * loss[i]
        lo, hi = np.percentile(loss, 1), np.percentile(loss, 99)
        hi = hi if hi > lo else lo + 1e-6
        box = (ox + 50, oy + 20, ox + W - 10, oy + H - 24)
        draw.rectangle(box, outline=(160, 160, 160))
        px = lambda s, v: (box[0] + (s - steps[0]) / max(steps[-1] - steps[0], 1)
                           * (box[2] - box[0]),
                           box[3] - (min(max(v, lo), hi) - lo) / (hi - lo) * (box[3] - box[1]))
        draw.line([px(s, v) for s, v in zip(steps, loss)], fill=(170, 190, 235), width=1)
        draw.line([px(s, v) for s, v in zip(steps, smooth)], fill=(20, 60, 160), width=2)
        _label(draw, (ox + 2, box[1]), f"{hi:.3g}")
        _label(draw, (ox + 2, box[3] - 10), f"{lo:.3g}")
        _label(draw, (box[0], box[3] + 4), f"step {int(steps[0])}")
        _label(draw, (box[2] - 70, box[3] + 4), f"step {int(steps[-1])}")
    out = out or os.path.join(ckpt_dir, "loss_curves.png")
    with data.atomic_path(out) as tmp:
        img.save(tmp, format="PNG")
    return out


def export(out, dest, models):
    """Write EMA-only model files (what sample.py loads) of the checkpoints in `out` into `dest`."""
    os.makedirs(dest, exist_ok=True)
    for s, l in models:
        src = os.path.join(out, cascade.model_filename(s, l))
        try:
            ck = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            sys.exit(f"error: {src}: not a readable checkpoint ({type(e).__name__})")
        keep = {k: ck[k] for k in ("format", "preset", "stage", "level", "conditioned",
                                   "unet_config", "step")}
        keep.update(mpp=ck.get("mpp"), args=ck.get("args"))
        why = cascade.weights_problem(ck["ema"])  # non-finite, or beyond fp16's range
        if why:
            sys.exit(f"error: {src}: its EMA weights are broken ({why}); not exported")
        # fp16 halves the files (the demo's models ship in the repository); loading casts to fp32
        keep["ema"] = {k: v.half() if v.is_floating_point() else v for k, v in ck["ema"].items()}
        with data.atomic_path(os.path.join(dest, cascade.model_filename(s, l))) as tmp:
            torch.save(keep, tmp)
        print(f"exported {src} (step {ck['step']}) -> {dest}")


# ---------------------------------------------------------------------- recipes
# A recipe is the list of train.py runs (phases) that made a set of models, in a text file: '#'
# comments, one line `common: FLAGS` given to every phase, then one line of flags per phase. A phase
# trains its models up to its --max-steps and resumes exactly, so re-running the command continues
# where it stopped and a finished phase is skipped. Only --data, --out, --cache, --threads, --device
# and --export may be given beside --recipe; everything else is the recipe's.
RECIPE_FLAGS = ("data", "out", "cache", "threads", "device", "export")  # the user's, with --recipe



def read_recipe(path):
    """(common flags, [flags of each phase]) of a recipe file."""
    try:
        with open(path) as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as e:
        sys.exit(f"error: --recipe {path}: {e.strerror}; give a recipe file such as "
                 "checkpoints/demo/recipe.txt")
    if not lines or not lines[0].startswith("common:") or len(lines) < 2:
        sys.exit(f"error: --recipe {path}: expected a line 'common: FLAGS', then one line of flags "
                 "per phase")
    return shlex.split(lines[0][len("common:"):]), [shlex.split(ln) for ln in lines[1:]]


def run_recipe(args):
    """Each phase of the recipe file as its own training run (train_models), then the export."""
    common, phases = read_recipe(args.recipe)
    mine = [f for k in RECIPE_FLAGS if k != "export" and getattr(args, k) is not None
            for f in (f"--{k}", str(getattr(args, k)))]
    for i, phase in enumerate(phases):
        argv = common + phase + mine
        print(f"recipe {args.recipe}, phase {i + 1}/{len(phases)}: train.py {shlex.join(argv)}",
              flush=True)
        if train_models(parse_args(argv)) is False:
            return print(f"recipe {args.recipe}: stopped in phase {i + 1}; the same command "
                         "continues it")
    if args.export:
        every = parse_args(common + ["--stage", "all", "--level", "all", "--out", args.out])
        export(every.out, args.export, models_to_train(every))


def main(argv=None):
    args = parse_args(argv)
    if args.recipe:
        return run_recipe(args)
    if args.plot:
        return print(f"wrote {plot_curves(args.plot)}")
    if args.export:
        return export(args.out, args.export, models_to_train(args))
    if args.plan:
        return print_plan(args)
    return train_models(args)


if __name__ == "__main__":
    main()
