"""Train one of the nine URCDM models (a (stage, level) pair), or all of them.

    python train.py --preset demo --stage 2 --level 1 --data SLIDES_DIR --out CKPT_DIR
    torchrun --nproc_per_node=9 train.py --stage 3 --level 0 --data ... --out ...   # data-parallel
    torchrun --nproc_per_node=9 train.py --stage all --level all ...   # one model per rank, as the paper

Re-running the same command resumes from CKPT_DIR/stage{s}_level{l}.pt. Randomness is derived
from (seed, step, rank) and the data position is saved, so a resumed run continues exactly
where it stopped (on CPU: bit-identical weights to an uninterrupted run).

References
  [PAPER]   Cechnicka et al., URCDM, MICCAI 2024 (gradient clipping 1, v-parametrisation, 200k steps).
  [Imagen]  Saharia et al., 2022 (Adam lr 1e-4, betas (0.9, 0.99); conditioning augmentation).
  [SDE-v]   Salimans & Ho, 2022 (v-prediction loss).  [nanoGPT] the torchrun / DDP skeleton.
"""
import argparse
import copy
import dataclasses
import hashlib
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import cascade
import data
import sde
import unet as unet_mod


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo", help="geometry and model sizes (cascade.PRESETS)")
    ap.add_argument("--stage", default="1", help="1, 2, 3 or 'all'")
    ap.add_argument("--level", default="0", help="0, 1, 2 or 'all'")
    ap.add_argument("--data", default=None, help="a slide file or a directory of slides (required to train)")
    ap.add_argument("--out", required=True, help="checkpoint directory (stage{s}_level{l}.pt)")
    ap.add_argument("--batch", type=int, default=8, help="per-process batch; global batch = batch x ranks")
    ap.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate [Imagen]")
    ap.add_argument("--max-steps", type=int, nargs="+", default=[200_000],
                    help="total optimiser steps [PAPER: 200k]; three values = one per level (0 1 2)")
    ap.add_argument("--ema", type=float, default=0.9999, help="EMA decay (warm-up: min(ema, (1+n)/(10+n)))")
    ap.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    ap.add_argument("--keep", type=int, default=3, help="numbered snapshots to keep (0: none)")
    ap.add_argument("--sample-every", type=int, default=0, help="write a PNG of EMA samples every N steps (0: off)")
    ap.add_argument("--sample-steps", type=int, default=25, help="sampling steps for those PNGs")
    ap.add_argument("--log-every", type=int, default=50, help="print the loss every N steps")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto = bf16 autocast on CUDA, fp32 on CPU; bf16 on CPU needs native support")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (the saved one is uncompiled)")
    ap.add_argument("--crop", type=int, default=None,
                    help="side of the top level's random training crops (default: the preset's train_crop); "
                         "the level's full size trains on what sampling feeds (see README, 'Training')")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-snr-gamma", type=float, default=None, help="min-SNR-gamma loss weight (None: off)")
    ap.add_argument("--outpaint", action="store_true", help="train the outpainting baseline (no lower-stage crops)")
    ap.add_argument("--region-size", type=int, default=None, help="level-0 side of each slide's region (default N3)")
    ap.add_argument("--cache", default=None, help="cache directory for stage images (default beside the slides)")
    ap.add_argument("--workers", type=int, default=None, help="data loader workers (default: 4 on CUDA, 0 on CPU)")
    ap.add_argument("--max-nonfinite", type=int, default=20, help="stop after this many non-finite losses in a row")
    ap.add_argument("--export", metavar="DIR", default=None,
                    help="do not train: write EMA-only fp16 model files of the --out checkpoints into DIR")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    return ap.parse_args(argv)


def models_to_train(args):
    """[(stage, level), ...] from --stage / --level."""
    pick = lambda v, allv, name: allv if v == "all" else [int(v)] if v.isdigit() and int(v) in allv else \
        sys.exit(f"error: --{name} {v!r}: use one of {allv} or 'all'")
    return [(s, l) for s in pick(args.stage, [1, 2, 3], "stage") for l in pick(args.level, [0, 1, 2], "level")]


def atomic_save(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def train_preset(args):
    """The preset, with the top level's training crop from --crop."""
    preset = cascade.get_preset(args.preset)
    if args.crop is None:
        return preset
    top = preset.level_sizes[-1]
    if not (8 <= args.crop <= top and args.crop % 8 == 0):
        sys.exit(f"error: --crop {args.crop}: use a multiple of 8 from 8 to {top} (the top level's size) for preset {preset.name}")
    return dataclasses.replace(preset, train_crop=args.crop)


class Trainer:
    def __init__(self, args, preset, stage, level, rank, world, ddp, device):
        self.args, self.preset, self.stage, self.level = args, preset, stage, level
        self.rank, self.world, self.ddp, self.device = rank, world, ddp, device
        self.cfg = cascade.unet_config(self.preset, stage, level, conditioned=not args.outpaint)
        self.schedule = self.preset.schedules[level]
        self.path = os.path.join(args.out, cascade.model_filename(stage, level))
        torch.manual_seed(args.seed)  # identical initial weights on every rank
        self.model = unet_mod.UNet(self.cfg).to(device, memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=args.lr, betas=(0.9, 0.99))
        self.step, self.position, self.nonfinite_total = 0, 0, 0
        steps = args.max_steps
        if len(steps) not in (1, 3):
            sys.exit("error: --max-steps takes one value, or three (one per level)")
        self.max_steps = steps[0] if len(steps) == 1 else steps[level]
        if os.path.exists(self.path):
            self.resume()
        self.net = self.model
        if ddp:
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        if args.compile:
            self.net = torch.compile(self.net)
        bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
        self.autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

    # -------------------------------------------------------------- checkpoints
    def state(self):
        return cascade.model_payload(
            self.preset, self.stage, self.level, self.cfg, self.ema.state_dict(), conditioned=not self.args.outpaint,
            model=self.model.state_dict(), optimizer=self.opt.state_dict(), step=self.step,
            data_position=self.position, nonfinite_total=self.nonfinite_total, seed=self.args.seed)

    def resume(self):
        ck = torch.load(self.path, map_location="cpu", weights_only=True)
        if "model" not in ck:
            sys.exit(f"error: {self.path} holds EMA weights only (an exported model); it cannot resume training")
        mine = cascade.model_payload(self.preset, self.stage, self.level, self.cfg, None,
                                     conditioned=not self.args.outpaint, seed=self.args.seed)
        ck["preset"] = {k: v for k, v in ck["preset"].items() if k in self.preset.model_dict()}
        mine["preset"] = self.preset.model_dict()
        for key in ("preset", "stage", "level", "unet_config", "conditioned", "seed"):
            if ck.get(key) != mine[key]:
                sys.exit(f"error: {self.path} was trained with another {key} ({ck.get(key)!r}, now {mine[key]!r}); "
                         "use another --out or the original settings")
        self.model.load_state_dict(ck["model"])
        self.ema.load_state_dict(ck["ema"])
        self.opt.load_state_dict(ck["optimizer"])
        for group in self.opt.param_groups:  # --lr wins over the saved one (e.g. a lower-lr second phase)
            group["lr"] = self.args.lr
        self.step, self.position, self.nonfinite_total = ck["step"], ck["data_position"], ck["nonfinite_total"]
        if self.rank == 0:
            print(f"resuming {self.path} at step {self.step}", flush=True)

    def save(self):
        if self.rank != 0:
            return
        st = self.state()
        atomic_save(st, self.path)
        if self.args.keep > 0:
            base = self.path[:-3]
            atomic_save(st, f"{base}.step{self.step:08d}.pt")
            snaps = sorted(f for f in os.listdir(self.args.out)
                           if f.startswith(os.path.basename(base) + ".step") and f.endswith(".pt"))
            for old in snaps[:-self.args.keep]:
                os.remove(os.path.join(self.args.out, old))

    # -------------------------------------------------------------- one step
    def batch_indices(self, position):
        B = self.args.batch
        return [position + self.rank * B + b for b in range(B)]

    def loss(self, batch, g):
        x0 = batch["x0"].to(self.device, memory_format=torch.channels_last)
        cond = batch["cond"].to(self.device, memory_format=torch.channels_last)
        aug_lam = None
        if cond.shape[1] == 0:
            cond = None
        else:  # conditioning augmentation: t_aug ~ U(0, max) per sample [CDM, Imagen]
            t_aug = sde.rand(x0.shape[0], g) * self.preset.aug_train_max
            cond, _ = sde.augment_cond(cond, t_aug, g)
            aug_lam = sde.log_snr(t_aug, "cosine").float().to(self.device)

        def model_fn(x_t, t):
            with torch.autocast(**self.autocast):
                return self.net(x_t, sde.log_snr(t.cpu(), self.schedule).float().to(self.device), cond, aug_lam).float()
        return sde.loss_fn(model_fn, x0, schedule=self.schedule, min_snr_gamma=self.args.min_snr_gamma, generator=g)

    def update_ema(self):
        decay = min(self.args.ema, (1 + self.step) / (10 + self.step))  # warm-up
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p, 1 - decay)
            for e, b in zip(self.ema.buffers(), self.model.buffers()):
                e.copy_(b)

    def all_mean(self, value):
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        if self.ddp:
            dist.all_reduce(t)
            t /= self.world
        return float(t)

    # -------------------------------------------------------------- preview samples
    @torch.no_grad()
    def write_samples(self, ds):
        """PNG rows: conditioning groups | EMA sample | target, for 4 fixed items."""
        items = [ds[10 ** 9 + k] for k in range(4)]
        x0 = torch.stack([it["x0"] for it in items])
        cond = torch.stack([it["cond"] for it in items]).to(self.device)
        g = torch.Generator().manual_seed(self.args.seed)
        aug_lam = None
        if cond.shape[1]:
            cond, t_aug = sde.augment_cond(cond, self.preset.aug_sample, g)
            aug_lam = sde.log_snr(t_aug.double(), "cosine").float().to(self.device)
        else:
            cond = None
        fn = lambda x_t, t: self.ema(x_t, sde.log_snr(t.cpu(), self.schedule).float().to(self.device), cond, aug_lam)
        x = sde.sample(fn, tuple(x0.shape), steps=self.args.sample_steps, schedule=self.schedule, generator=g,
                       device=self.device).clamp(-1, 1).cpu()
        groups = (list(cond.cpu().clamp(-1, 1).split(3, dim=1)) if cond is not None else []) + [x, x0]
        grid = cascade.to_uint8(torch.cat(groups, dim=3))  # (4, L, L * n, 3)
        os.makedirs(os.path.join(self.args.out, "samples"), exist_ok=True)
        path = os.path.join(self.args.out, "samples", f"stage{self.stage}_level{self.level}_step{self.step:08d}.png")
        Image.fromarray(np.concatenate(list(grid))).save(path)

    # -------------------------------------------------------------- the loop
    def train(self, ds, stop_flag):
        args, G = self.args, self.args.batch * self.world
        workers = args.workers if args.workers is not None else (4 if self.device.type == "cuda" else 0)
        loader = iter(torch.utils.data.DataLoader(
            ds, batch_sampler=_IndexLists(self, self.position), num_workers=workers,
            persistent_workers=workers > 0))
        if self.rank == 0:
            print(f"stage {self.stage} level {self.level}: {unet_mod.count_params(self.cfg) / 1e6:.2f} M params, "
                  f"batch {args.batch} x {self.world} ranks = global batch {G}, steps {self.step} -> {self.max_steps}",
                  flush=True)
        bad_in_a_row, t0, step0, loss_sum, loss_n = 0, time.time(), self.step, 0.0, 0
        while self.step < self.max_steps:
            batch = next(loader)
            seed = sde.derive_seed(args.seed, self.stage, self.level, self.step, self.rank)
            torch.manual_seed(seed)  # dropout
            loss = self.loss(batch, torch.Generator().manual_seed(seed))
            # Skip non-finite steps on every rank together (DDP needs all ranks to step alike).
            finite = self.all_mean(float(torch.isfinite(loss))) == 1.0
            self.opt.zero_grad(set_to_none=True)
            if finite:
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)  # [PAPER] clip at 1
                finite = bool(torch.isfinite(norm))
            if finite:
                self.opt.step()
                self.update_ema()
                bad_in_a_row = 0
                loss_sum, loss_n = loss_sum + self.all_mean(loss.detach()), loss_n + 1
            else:
                bad_in_a_row += 1
                self.nonfinite_total += 1
                if bad_in_a_row >= args.max_nonfinite:
                    raise FloatingPointError(f"{bad_in_a_row} non-finite losses in a row at step {self.step}; stopped "
                                             f"(last good checkpoint kept: {self.path}); lower --lr or check the data")
            self.step += 1
            self.position += G
            if self.rank == 0 and (self.step % args.log_every == 0 or self.step == self.max_steps) and loss_n:
                dt = time.time() - t0
                rate = (self.step - step0) / dt
                eta = (self.max_steps - self.step) / max(rate, 1e-9)
                print(f"stage {self.stage} level {self.level} step {self.step}/{self.max_steps} "
                      f"loss {loss_sum / loss_n:.4f} {rate * G:.1f} img/s "
                      f"non-finite {self.nonfinite_total} eta {eta / 60:.1f} min", flush=True)
                loss_sum, loss_n = 0.0, 0
            if self.rank == 0 and args.sample_every and self.step % args.sample_every == 0:
                self.write_samples(ds)
            stopping = self.all_mean(float(stop_flag[0])) > 0
            if self.step % args.save_every == 0 or self.step == self.max_steps or stopping:
                self.save()
            if stopping:
                if self.rank == 0:
                    print(f"stopped by signal at step {self.step}; checkpoint saved to {self.path}", flush=True)
                return False
        if self.ddp:  # proof that data parallelism kept the replicas identical
            digest = hashlib.sha1(b"".join(p.detach().cpu().numpy().tobytes() for p in self.model.parameters()))
            print(f"rank {self.rank}: weights sha1 {digest.hexdigest()}", flush=True)
        return True


class _IndexLists(torch.utils.data.Sampler):
    """Per-step index lists of this rank, from a data position on (samples consumed so far)."""

    def __init__(self, trainer, position):
        self.trainer, self.position = trainer, position

    def __iter__(self):
        pos = self.position
        while True:
            yield self.trainer.batch_indices(pos)
            pos += self.trainer.args.batch * self.trainer.world


def export(args, models):
    """Write EMA-only model files (what sample.py loads) from training checkpoints."""
    dest = args.export
    os.makedirs(dest, exist_ok=True)
    for s, l in models:
        src = os.path.join(args.out, cascade.model_filename(s, l))
        ck = torch.load(src, map_location="cpu", weights_only=True)
        keep = {k: ck[k] for k in ("format", "preset", "stage", "level", "conditioned", "unet_config", "step")}
        # fp16 halves the files (the demo's nine models ship in the repository); loading casts back to fp32
        keep["ema"] = {k: v.half() if v.is_floating_point() else v for k, v in ck["ema"].items()}
        atomic_save(keep, os.path.join(dest, cascade.model_filename(s, l)))
        print(f"exported {src} (step {ck['step']}) -> {dest}")


def main(argv=None):
    args = parse_args(argv)
    models = models_to_train(args)
    if args.export:
        return export(args, models)
    if args.data is None:
        sys.exit("error: --data SLIDES is required to train (a slide file or a directory of slides)")
    ddp, rank, world, device = cascade.init_distributed(args.device)
    os.makedirs(args.out, exist_ok=True)
    try:
        slides = data.list_slides(args.data)
    except data.SlideError as e:
        sys.exit(f"error: --data {e}")
    stop_flag = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop_flag.__setitem__(0, True))  # preemption: save, then exit
    preset = train_preset(args)
    if len(models) == 1:
        jobs, sync = [(models[0], rank, world)], ddp
    else:  # the paper's way: one model per rank, each trained alone (no gradient sync)
        jobs, sync = [(m, 0, 1) for m in models[rank::world]], False
        if rank == 0:
            print(f"{len(models)} models on {world} process(es): " + "; ".join(
                f"rank {r}: {models[r::world]}" for r in range(min(world, len(models)))), flush=True)
    for (s, l), r, w in jobs:
        trainer = Trainer(args, preset, s, l, r, w, sync, device)
        ds = data.StageLevelDataset(slides, preset, s, l, region_size=args.region_size, cache_dir=args.cache,
                                    seed=args.seed, length=2 ** 62, conditioned=not args.outpaint, rank=rank)
        if trainer.step >= trainer.max_steps:
            if trainer.rank == 0:
                print(f"{trainer.path}: already at step {trainer.step} >= --max-steps; nothing to do")
            continue
        if not trainer.train(ds, stop_flag):
            break
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
