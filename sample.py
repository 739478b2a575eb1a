"""Generate a whole synthetic slide with URCDM and write it as a pyramidal BigTIFF.

    python sample.py --out slide.tif                  # the demo preset with the shipped models
    python sample.py --preset paper --ckpt CKPT_DIR --out slide.svs --order wavefront --batch 16
    torchrun --nproc_per_node=8 sample.py ...          # each round's patches split across ranks
    python sample.py --preset paper --dry-run --out x.tif   # full geometry, cheap stand-in models
    python sample.py --from REAL.svs --start-stage 3 --out twin.tif   # zoom into a real slide
    python sample.py --n 100 --out synth/slide.tif     # 100 slides and synth/slide.tif.manifest.json
    torchrun --nnodes=2 --node_rank=K --master_addr=HOST ... sample.py ...   # rank 0 alone holds files

The algorithm [PAPER Fig. 1]: stage 1 generates the whole slide at N1 px; stages 2 and 3 each
generate an overlapping grid of patches, every patch conditioned on the stage below and on its
finished neighbours (tiler.py); the last stage is written as an Aperio-style slide
(data.write_aperio). Stage images live in files under OUT.work/ (never all in memory), with a
journal of finished patches: after a crash, --resume continues and produces the same slide,
bit for bit on CPU.

References
  [PAPER]     Cechnicka et al., URCDM, MICCAI 2024 (Sec. 2, Fig. 1).
"""
import argparse
import dataclasses
import fcntl
import json
import os
import shutil
import sys
import time

import numpy as np
import tifffile
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

import cascade
import data
import sde
import tiler

DEMO_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "demo")


def fail(msg):
    sys.exit(f"error: {msg}")


# ----------------------------------------------------------------------------- settings

@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run's slide depends on, resolved once from the flags and the preset. The
    journal stores it; --resume requires the same."""
    preset: str
    seed: int
    stages: int                 # stop after this stage
    order: str                  # tiler.ORDERS
    batch: int                  # patches per U-Net batch
    white_threshold: float      # patches whose region is less tissue are filled (stages in fill_white)
    outpaint: bool              # stage 3 from its neighbours only (the paper's baseline)
    dry_run: bool               # cheap stand-in models
    precision: str              # fp32 or bf16 (resolved from auto)
    sampling: dict              # cascade.Sampling as a dict (steps, sampler, eta, ... after the flags)
    models: dict                # {file name: sha256} of the model files used ({} for --dry-run)
    ckpt: str                   # the model directory, resolved
    from_slide: str = ""        # --from: a real slide whose lower stage is used ("" = none)
    start_stage: int = 1        # the first stage generated (1; 2-3 with --from; 3 for --outpaint)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output slide (.tif or .svs): Aperio-style pyramidal BigTIFF")
    ap.add_argument("--ckpt", default=None, help=f"directory with stage{{s}}_level{{l}}.pt (default: {DEMO_CKPT})")
    ap.add_argument("--preset", default="demo", help=f"geometry, models and defaults: {', '.join(cascade.PRESETS)}")
    ap.add_argument("--seed", type=int, default=0, help="the slide's seed; every patch's noise derives from it")
    g = ap.add_argument_group("sampling (default: the preset's)")
    g.add_argument("--sampler", default=None, choices=sde.SAMPLERS, help="step rule")
    g.add_argument("--steps", type=int, nargs="+", default=None, metavar="N",
                   help="steps per level (3 values), or per stage and level (9: stage 1's levels 0-2, stage 2's, stage 3's)")
    g.add_argument("--eta", type=float, default=None, help="DDIM's noise scale (0 = deterministic, 1 = ancestral)")
    g.add_argument("--threshold", type=float, default=None, help="dynamic thresholding quantile of x0_hat (0 = off)")
    g.add_argument("--resample", type=int, default=None, help="RePaint resampling jumps per step (1 = off)")
    g.add_argument("--aug-level", type=float, default=None, help="conditioning augmentation level t_aug")
    g.add_argument("--edge-margin", type=int, default=None,
                   help="px at a patch's inner edges that the next patch redraws (0 = hold the whole overlap, as the paper)")
    g.add_argument("--feather", type=int, default=None,
                   help="px over which known pixels fade into the new patch (0 = pasted exactly, as the paper)")
    g.add_argument("--fill-white", type=int, nargs="*", default=None, choices=[2, 3], metavar="STAGE",
                   help="stages whose mostly-white patches are filled from the stage below (none: generate all)")
    ap.add_argument("--white-threshold", type=float, default=data.MIN_TISSUE,
                    help="'mostly white': a region less tissue than this (default data.MIN_TISSUE, training's rule)")
    ap.add_argument("--order", default="wavefront", choices=tiler.ORDERS,
                    help="raster (the paper), wavefront (same slide, 136 rounds at paper size), checkerboard (4 rounds, another slide)")
    ap.add_argument("--batch", type=int, default=8, help="patches per U-Net batch (a run's slide depends on it on CPU)")
    ap.add_argument("--stages", type=int, default=3, choices=[1, 2, 3], help="stop after this stage")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run (OUT.work/)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out and discard OUT.work/")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="U-Net arithmetic: auto = bf16 autocast on CUDA and on CPUs with native bf16, else fp32")
    ap.add_argument("--mpp", type=float, default=None,
                    help="microns per pixel of the final stage (default: from the models' training slides)")
    ap.add_argument("--compression", default="jpeg", choices=["jpeg", "zlib"], help="tile compression")
    ap.add_argument("--outpaint", action="store_true", help="the outpainting baseline: stage 3 without the stage below")
    ap.add_argument("--from", dest="from_slide", default=None, metavar="SLIDE",
                    help="zoom into a real slide: its lower stage, built as training builds it, replaces the generated one")
    ap.add_argument("--start-stage", type=int, default=None, choices=[2, 3],
                    help="with --from: the first stage to generate (2: from the slide's stage-1 image; 3: from its stage 2)")
    ap.add_argument("--seeds", default=None, help="many slides: '0-99' or '0,4,7'; OUT gets _s<seed> before its suffix")
    ap.add_argument("--n", type=int, default=None, help="many slides: N seeds from --seed on")
    ap.add_argument("--dry-run", action="store_true", help="cheap deterministic stand-in for the U-Nets (no checkpoints)")
    ap.add_argument("--keep-work", action="store_true", help="keep OUT.work/ (stage images, journal) at the end")
    return ap.parse_args(argv)


def resolve(args, device, rank=0):
    """Settings from the flags and the preset: every default and every check in one place,
    before any work. Returns (Settings, preset)."""
    try:
        preset = cascade.get_preset(args.preset)
    except ValueError as e:
        fail(f"--preset {e}")
    start = check_from(args, preset) if args.from_slide else (3 if args.outpaint else 1)
    stages = list(range(start, args.stages + 1))
    sampling = resolve_sampling(args, preset)
    ckpt, models = ("", {}) if args.dry_run else check_models(args, preset, stages)
    if rank == 0:  # only rank 0 writes (other machines need no shared file system)
        check_out(args, preset, stages)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cascade.native_bf16(device))
    return Settings(preset=preset.name, seed=args.seed, stages=max(stages), order=args.order, batch=args.batch,
                    white_threshold=args.white_threshold, outpaint=args.outpaint, dry_run=args.dry_run,
                    precision="bf16" if bf16 else "fp32", sampling=dataclasses.asdict(sampling), models=models,
                    ckpt=ckpt, from_slide=os.path.realpath(args.from_slide) if args.from_slide else "",
                    start_stage=start), preset


def check_from(args, p):
    """--from SLIDE --start-stage S: a readable slide at least the region's size, S within --stages.
    Returns S."""
    start = args.start_stage or 2
    if args.outpaint:
        fail("--from and --outpaint: choose one (the outpainting baseline has no lower stage)")
    if start > args.stages:
        fail(f"--start-stage {start} with --stages {args.stages}: nothing to generate")
    try:
        W, H = data.open_slide(args.from_slide).dimensions
    except data.SlideError as e:
        fail(f"--from {e}")
    N3 = cascade.stage_size(p, 3)
    if min(W, H) < N3:
        fail(f"--from {args.from_slide}: {W} x {H} px is smaller than preset {p.name}'s {N3} px region; "
             "use a larger slide or another preset")
    return start


def resolve_sampling(args, p):
    """The preset's Sampling with the flags that override it, each flag checked."""
    sp = p.sampling
    checks = [("--batch", args.batch, args.batch >= 1, ">= 1"),
              ("--steps", args.steps, args.steps is None or (len(args.steps) in (3, 9) and min(args.steps) >= 1),
               "list of 3 (per level) or 9 (per stage and level), each >= 1"),
              ("--resample", args.resample, args.resample is None or args.resample >= 1, ">= 1"),
              ("--eta", args.eta, args.eta is None or args.eta >= 0, ">= 0"),
              ("--threshold", args.threshold, args.threshold is None or 0 <= args.threshold <= 1, "in [0, 1]"),
              ("--aug-level", args.aug_level, args.aug_level is None or 0 <= args.aug_level <= 1, "in [0, 1]"),
              ("--white-threshold", args.white_threshold, 0 <= args.white_threshold <= 1, "in [0, 1]"),
              ("--mpp", args.mpp, args.mpp is None or args.mpp > 0, "> 0 (microns per pixel)"),
              ("--feather", args.feather, args.feather is None or 0 <= args.feather <= p.patch // 16,
               f"in 0 .. {p.patch // 16} px for preset {p.name} (half its {p.patch // 8} px overlap)")]
    for flag, value, ok, rule in checks:
        if not ok:
            fail(f"{flag} {value}: use a value {rule}")
    margin = sp.edge_margin if args.edge_margin is None else args.edge_margin
    try:  # checked by the rule the tiler applies
        cascade.Grid(p.patch, 1, margin)
    except ValueError as e:
        fail(f"--edge-margin (preset {p.name}): {e}")
    pick = lambda flag, default: default if flag is None else flag
    return dataclasses.replace(
        sp, steps=tuple(pick(args.steps, sp.steps)), sampler=pick(args.sampler, sp.sampler), eta=pick(args.eta, sp.eta),
        threshold=sp.threshold if args.threshold is None else (args.threshold or None),
        resample=pick(args.resample, sp.resample), aug_level=pick(args.aug_level, sp.aug_level),
        edge_margin=margin, feather=pick(args.feather, sp.feather),
        fill_white=tuple(pick(args.fill_white, sp.fill_white)))


def check_models(args, p, stages):
    """The model directory (resolved) and {file: sha256} of the files the stages need; each file's
    identity is checked now, cheaply (mmap: no weights read), not after hours of work."""
    ckpt = os.path.realpath(args.ckpt or DEMO_CKPT)
    if not os.path.isdir(ckpt):
        fail(f"--ckpt {ckpt}: no such directory. Train the nine models with train.py (README, 'Training') "
             "or pass --dry-run to try the pipeline without models")
    names = [cascade.model_filename(s, lvl) for s in stages for lvl in range(3)]
    for n in names:
        path, (s, lvl) = os.path.join(ckpt, n), (int(n[5]), int(n[12]))
        if not os.path.isfile(path):
            fail(f"--ckpt {ckpt}: missing model file {n}; train it with `python train.py --preset {p.name} "
                 f"--stage {s} --level {lvl}` or point --ckpt elsewhere")
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001
            fail(f"--ckpt {path}: not a readable URCDM model file ({type(e).__name__})")
        why = cascade.checkpoint_mismatch(ck, p, s, lvl, None if args.outpaint else True)
        if why:
            fail(f"--ckpt {path}: {why}")
    return ckpt, {n: data.file_digest(os.path.join(ckpt, n)) for n in names}


def check_out(args, p, stages):
    """--out names a file in a writable directory with room for the run."""
    out = os.path.abspath(args.out)
    if os.path.isdir(out):
        fail(f"--out {args.out} is a directory; give a file name such as {os.path.join(args.out, 'slide.tif')}")
    folder = os.path.dirname(out)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        fail(f"--out {args.out}: cannot write into {folder} (missing or read-only)")
    need = sum(3 * cascade.stage_size(p, s) ** 2 for s in stages) * 1.4  # stage images, pyramid temps, slide
    free = shutil.disk_usage(folder).free
    if free < need and not args.resume:
        fail(f"--out {args.out}: this run needs about {need / 1e9:.1f} GB in {folder}, {free / 1e9:.1f} GB are free")


# ----------------------------------------------------------------------------- the journal

class Journal:
    """OUT.work/journal.json: the run's settings and its finished patches, so that --resume
    continues where a run stopped. A round's results are first saved whole (round.npz), then
    written to the stage image, then marked done: a run killed in between re-applies the saved
    round instead of regenerating from a half-written image."""

    def __init__(self, work, settings):
        self.work, self.path, self.round_path = work, os.path.join(work, "journal.json"), os.path.join(work, "round.npz")
        self.state = {"settings": dataclasses.asdict(settings), "done": {}, "filled": {}, "seconds": {},
                      "model_seconds": {}}

    def done(self, stage):
        return [tuple(c) for c in self.state["done"].get(str(stage), [])]

    def save(self):
        data.write_json(self.path, self.state)

    def load(self):
        with open(self.path) as f:
            self.state = json.load(f)

    def stage_round(self, stage, results):
        """Save a round's results before they touch the stage image."""
        cells = np.array([c for c, _, _ in results], np.int64).reshape(-1, 2)
        with data.atomic_path(self.round_path) as tmp:
            np.savez(tmp, stage=stage, cells=cells, pixels=np.stack([px for _, px, _ in results]),
                     filled=np.array([f for _, _, f in results], bool))

    def pending_round(self):
        """(stage, results) of a round saved but not marked done, or None."""
        if not os.path.exists(self.round_path):
            return None
        z = np.load(self.round_path)
        if str(int(z["stage"])) in self.state["done"] and tuple(z["cells"][0]) in self.done(int(z["stage"])):
            return None  # marked done already; the file was left by a kill before its removal
        return int(z["stage"]), [(tuple(map(int, c)), px, bool(f)) for c, px, f in zip(z["cells"], z["pixels"], z["filled"])]

    def mark(self, stage, results, seconds, model_seconds=0.0):
        key = str(stage)
        self.state["done"].setdefault(key, []).extend([list(c) for c, _, _ in results])
        self.state["filled"].setdefault(key, []).extend([list(c) for c, _, f in results if f])
        self.state["seconds"][key] = self.state["seconds"].get(key, 0) + seconds
        self.state["model_seconds"][key] = self.state["model_seconds"].get(key, 0) + model_seconds
        self.save()
        if os.path.exists(self.round_path):
            os.remove(self.round_path)


def open_work(args, settings, rank, world):
    """OUT.work/ with its journal, locked for this run (rank 0 holds an exclusive lock). A run
    with finished patches is continued only with --resume and discarded only with --overwrite;
    a work directory without any finished patch never blocks a fresh start."""
    work = args.out + ".work"
    journal, lock = Journal(work, settings), None
    if rank == 0:
        if os.path.exists(args.out) and not args.overwrite:
            fail(f"--out {args.out} exists; pass --overwrite to replace it")
        os.makedirs(work, exist_ok=True)
        lock = open(os.path.join(work, "lock"), "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            fail(f"{work} is in use by another sample.py run (pid {lock.read().strip() or '?'}); wait for it or "
                 "choose another --out")
        lock.seek(0), lock.truncate(), lock.write(str(os.getpid())), lock.flush()
        started = os.path.exists(journal.path)
        if started:
            journal.load()
        has_work = started and any(journal.state["done"].values())
        if has_work and args.resume:
            old, new = journal.state["settings"], json.loads(json.dumps(dataclasses.asdict(settings)))
            diff = [k for k in new if old.get(k) != new[k]]
            if diff:
                fail(f"--resume with other settings than the interrupted run ({', '.join(diff)}: "
                     f"{[old.get(k) for k in diff]} then, {[new[k] for k in diff]} now); "
                     "use the original flags and models, or --overwrite")
        elif has_work and not args.overwrite:
            fail(f"{work} holds an unfinished run; pass --resume to continue it or --overwrite to restart")
        else:
            if args.resume:
                print(f"nothing to resume in {work}; starting afresh", file=sys.stderr)
            for f in os.listdir(work):
                if f != "lock":
                    path = os.path.join(work, f)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            journal = Journal(work, settings)
            journal.save()
    share_journal(journal, world)
    return work, journal, lock


def barrier(world):
    if world > 1:
        dist.barrier()


def share_journal(journal, world):
    """Rank 0's journal state to every rank: only rank 0 reads or writes files, so ranks on other
    machines need no shared file system."""
    if world > 1:
        state = [journal.state]
        dist.broadcast_object_list(state, src=0)
        journal.state = state[0]


# ----------------------------------------------------------------------------- models

class DryRunCDM:
    """A cheap deterministic stand-in for a stage's CDM (--dry-run): the upsampled region of
    the stage below plus seeded noise (stage 1: a smooth seeded tissue-like field). It keeps
    the known pixels, so the whole pipeline (geometry, I/O, resume, ranks) runs for real."""

    def __init__(self, preset, stage):
        self.preset, self.stage = preset, stage

    def sample(self, generators, *, known=None, mask=None, context=None, region=None, **_):
        P = self.preset.patch
        noise = torch.stack([torch.randn(3, P, P, generator=g) for g in generators])
        if region is None:  # stage 1: blobs of pink tissue on white glass
            low = torch.stack([torch.rand(1, 6, 6, generator=g) for g in generators])
            t = torch.nn.functional.interpolate(low, size=(P, P), mode="bicubic", align_corners=False)
            pink = torch.tensor([0.75, 0.2, 0.6]).view(1, 3, 1, 1)
            x = torch.where(t > 0.5, pink - 0.5 * (t - 0.5), torch.ones(1, 3, 1, 1))
        else:
            x = region
        x = (x + 0.03 * noise).clamp(-1, 1)
        return x if known is None else torch.where(mask, known, x)


def load_cdm(settings, preset, stage, device):
    if settings.dry_run:
        return DryRunCDM(preset, stage)
    try:
        return cascade.load_cdm(settings.ckpt, preset, stage, device, bf16=settings.precision == "bf16")
    except (FileNotFoundError, ValueError) as e:
        fail(f"--ckpt {e}")


class Timed:
    """A CDM's sample() that adds up the seconds spent in the model and counts non-finite output."""

    def __init__(self, cdm, sampling):
        self.cdm, self.sampling, self.seconds = cdm, sampling, 0.0

    def __call__(self, generators, **inputs):
        t0 = time.time()
        x = self.cdm.sample(generators, sampling=self.sampling, **inputs)
        self.seconds += time.time() - t0
        if not torch.isfinite(x).all():
            raise FloatingPointError("the model produced non-finite pixels (NaN or inf): its weights are broken; "
                                     "retrain or re-export it")
        return x


# ----------------------------------------------------------------------------- one grid stage

def scatter(batches, rank, world):
    """Rank 0's list of a round's batch inputs -> this rank's share (every world-th batch)."""
    if world == 1:
        return batches
    mine = [None]
    dist.scatter_object_list(mine, [batches[r::world] for r in range(world)] if rank == 0 else None, src=0)
    return mine[0]


def gather(results, rank, world):
    """Every rank's results of a round, on rank 0 (None elsewhere)."""
    if world == 1:
        return results
    parts = [None] * world if rank == 0 else None
    dist.gather_object(results, parts, dst=0)
    return [r for part in parts for r in part] if rank == 0 else None


def apply(canvas, grid, results):
    for (i, j), pixels, _ in results:
        canvas.write(*grid.origin(i, j), pixels)
    canvas.flush()  # pixels on disk before the journal says so


def progress(stage, journal, n_total, n_fill_left, t0, generated0):
    """One line: patches done, generated / filled; ETA from the generation rate alone (a
    filled patch costs next to nothing)."""
    done, filled = len(journal.done(stage)), len(journal.state["filled"].get(str(stage), []))
    generated = done - filled
    rate = (generated - generated0) / max(time.time() - t0, 1e-9)
    left_gen = n_total - done - n_fill_left
    eta = f"ETA {left_gen / rate / 60:.1f} min" if rate > 0 else "ETA -"
    print(f"stage {stage}: {done}/{n_total} patches ({generated} generated, {filled} filled as glass); "
          f"left: {left_gen} to generate, {n_fill_left} to fill; {rate:.2f} generated patches/s, {eta}",
          file=sys.stderr, flush=True)


def grid_stage(stage, lower_img, canvas, journal, settings, preset, device, rank, world):
    """Stage 2 or 3: the patch grid, round by round. Rank 0 reads every batch's inputs and sends
    each rank its share (every world-th batch), gathers the results, writes the round and marks
    it in the journal; the other ranks only compute. lower_img, canvas: None on other ranks."""
    S, sp = settings, cascade.Sampling(**settings.sampling)
    grid = cascade.stage_grid(preset, stage, sp.edge_margin)
    lower = None if S.outpaint or rank else tiler.Lower(lower_img, cascade.zoom(preset, stage), preset.background)
    white = tiler.WhiteTest(S.white_threshold, data.tissue_fraction) if stage in sp.fill_white and lower else None
    sample_fn = Timed(load_cdm(S, preset, stage, device), sp)
    share_journal(journal, world)
    todo = tiler.plan(S.order, grid.n, S.batch, journal.done(stage))
    cells = [c for rnd in todo for b in rnd for c in b]
    n_fill = sum(white(lower, *grid.origin(*c), grid.patch) for c in cells) if white else 0
    t0, gen0 = time.time(), len(journal.done(stage)) - len(journal.state["filled"].get(str(stage), []))
    read = lambda cells: tiler.batch_inputs(grid, canvas, cells, order=S.order, lower=lower, white=white)
    for rnd in todo:
        t_round, sample_fn.seconds = time.time(), 0.0
        # Generate: this rank's batches of the round (inputs read by rank 0; lazily in one process).
        mine = (read(b) for b in rnd) if world == 1 else scatter([read(b) for b in rnd] if rank == 0 else None,
                                                                   rank, world)
        results = [r for inputs in mine for r in tiler.run_batch(sample_fn, inputs, stage=stage, seed=S.seed,
                                                                 feather=sp.feather)]
        results = gather(results, rank, world)
        # Write: rank 0 saves the round, writes it into the stage image, marks it done.
        if rank == 0:
            journal.stage_round(stage, results)
            apply(canvas, grid, results)
            journal.mark(stage, results, time.time() - t_round, sample_fn.seconds)
            n_fill -= sum(f for _, _, f in results)
            progress(stage, journal, grid.n ** 2, n_fill, t0, gen0)
        barrier(world)


# ----------------------------------------------------------------------------- the slide file

def write_slide(args, settings, preset, images, journal, t_start):
    """Write the slide (temp name, then rename), the preview PNGs, and a summary."""
    final_stage = max(images)
    final = images[final_stage]
    mpp = args.mpp or model_mpp(settings, preset, final_stage)
    t0 = time.time()
    with data.atomic_path(args.out) as tmp:
        data.write_aperio(tmp, final, mpp=mpp, compression=args.compression, workdir=args.out + ".work")
    t_write = time.time() - t0
    for s in sorted(images)[:-1]:  # the lower stages, for metrics.py (magnifications 0-1, consistency)
        with data.atomic_path(f"{args.out}.stage{s}.png") as tmp:
            Image.fromarray(np.asarray(images[s][:])).save(tmp, format="PNG")
    previews = write_previews(args.out, images, preset)
    sp = cascade.Sampling(**settings.sampling)
    seams = {s: tiler.seam_score(images[s], cascade.stage_grid(preset, s, sp.edge_margin), settings.order)
             for s in sorted(images) if s > 1}
    lines = [f"wrote {args.out}: {final.shape[1]} x {final.shape[0]} px at {mpp:.4g} um/px, "
             f"{os.path.getsize(args.out) / 1e6:.1f} MB, {(time.time() - t_start) / 60:.1f} min in this run"]
    for s, secs in sorted(journal.state["seconds"].items()):
        n, filled = len(journal.done(int(s))), len(journal.state["filled"].get(s, []))
        model = journal.state["model_seconds"].get(s, secs)
        lines.append(f"  stage {s}: {n} patches in {secs:.1f} s ({n - filled} generated, {filled} filled as glass); "
                     f"outside the model {(secs - model) / max(n, 1):.3f} s/patch (rank 0)")
    if seams:
        lines.append("  seam score (1.0 = invisible): " + ", ".join(f"stage {s} {v:.3f}" for s, v in seams.items()))
    lower = [f"{args.out}.stage{s}.png" for s in sorted(images)[:-1]]
    lines.append(f"  pyramid written in {t_write:.1f} s; previews{' and lower stages' if lower else ''}: "
                 f"{', '.join(previews + lower)}")
    print("\n".join(lines), file=sys.stderr)


def model_mpp(settings, preset, stage):
    """Microns per pixel of a stage: the training slides' (carried in the model files) times
    the zoom from that stage to stage 3. 0.25 (40x) when the models do not say (--dry-run)."""
    mpp3 = 0.25
    if settings.models:
        path = os.path.join(settings.ckpt, sorted(settings.models)[-1])
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no weights read
        mpp3 = ck.get("mpp") or mpp3
    return mpp3 * cascade.stage_size(preset, 3) / cascade.stage_size(preset, stage)


def _fit(arr, side):
    """An (h, w, 3) uint8 array resized to fit side x side, as a PIL image."""
    im = Image.fromarray(arr)
    f = side / max(im.size)
    return im.resize((max(1, round(im.size[0] * f)), max(1, round(im.size[1] * f))), Image.BOX)


def write_previews(out, images, preset, side=512):
    """OUT.preview.png: the paper's Fig. 1 from our own output - stage 1 (whole slide), the
    stage-2 patch at its centre, the stage-3 patch at the centre of that, each with a box
    where the next one sits. OUT.thumbnail.png: the final slide, zoomed out."""
    P, panels = preset.patch, []
    centre = {s: (img.shape[0] - P) // 2 for s, img in images.items()}
    for s in sorted(images):
        img = images[s]
        crop = img[:] if s == 1 else img[centre[s]:centre[s] + P, centre[s]:centre[s] + P]
        im = _fit(np.asarray(crop), side).convert("RGB")
        if s + 1 in images:  # where the next stage's patch lies, in this panel's pixels
            r = cascade.zoom(preset, s + 1)
            y0 = centre[s + 1] / r - (0 if s == 1 else centre[s])
            f = side / crop.shape[0]
            box = [y0 * f, (y0 + P / r) * f]
            ImageDraw.Draw(im).rectangle([box[0], box[0], box[1], box[1]], outline=(0, 90, 255), width=3)
        panels.append(im)
    fig = Image.new("RGB", (len(panels) * (side + 8), side), "white")
    for k, im in enumerate(panels):
        fig.paste(im, (k * (side + 8), 0))
    paths = [out + ".preview.png", out + ".thumbnail.png"]
    fig.save(paths[0])
    with tifffile.TiffFile(out) as tif:  # the slide's smallest level: the canvas is never read whole
        smallest = tif.series[0].levels[-1].asarray()
    _fit(smallest.reshape(smallest.shape[-3:]), 1024).save(paths[1])
    return paths


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    ddp, rank, world, device = cascade.init_distributed(args.device)
    if args.seeds or args.n:
        many_slides(args, device, rank, world)
    else:
        generate(args, device, rank, world)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def generate(args, device, rank=0, world=1):
    """One slide [PAPER Fig. 1]. Returns the journal's state (rank 0)."""
    t_start = time.time()
    settings, preset = resolve(args, device, rank)
    work, journal, lock = open_work(args, settings, rank, world)
    stage_path = lambda s: os.path.join(work, f"stage{s}.npy")

    # A round saved but not marked done when the last run stopped: apply it as it was.
    pending = journal.pending_round() if rank == 0 else None
    if pending:
        s, results = pending
        grid = cascade.stage_grid(preset, s, settings.sampling["edge_margin"])
        canvas = data.DiskArray(stage_path(s))
        apply(canvas, grid, results)
        journal.mark(s, results, 0.0)
        canvas.close()
    barrier(world)

    # Stage 1: the whole slide, zoomed out, one CDM sample [PAPER Fig. 1, left].
    images = {}
    if settings.start_stage == 1:
        N1 = cascade.stage_size(preset, 1)
        if not journal.done(1) and rank == 0:
            t0, cdm = time.time(), Timed(load_cdm(settings, preset, 1, device), cascade.Sampling(**settings.sampling))
            x = cdm([tiler.patch_generator(settings.seed, 1, 0, 0)])
            img = data.DiskArray(stage_path(1), (N1, N1, 3))
            img.write(0, 0, cascade.to_uint8(x)[0])
            img.flush()
            journal.mark(1, [((0, 0), None, False)], time.time() - t0, cdm.seconds)
        barrier(world)
        images[1] = data.DiskArray(stage_path(1)) if rank == 0 else None
        print(f"stage 1: {N1} x {N1} done", file=sys.stderr)
    # Or (--from) a real slide's lower stage, built as training builds it, in place of generated ones.
    elif settings.from_slide:
        lower = settings.start_stage - 1
        if not journal.done(lower) and rank == 0:
            t0 = time.time()
            real_lower_stage(settings, preset, lower, stage_path(lower), work)
            journal.mark(lower, [((0, 0), None, False)], time.time() - t0)
        barrier(world)
        images[lower] = data.DiskArray(stage_path(lower)) if rank == 0 else None
        print(f"stage {lower}: taken from {settings.from_slide}", file=sys.stderr)

    # Stages 2 and 3: patch grids, each conditioned on the stage below [PAPER Fig. 1, middle, right].
    for s in range(max(settings.start_stage, 2), settings.stages + 1):
        if rank == 0 and not os.path.exists(stage_path(s)):
            N = cascade.stage_size(preset, s)
            with data.atomic_path(stage_path(s)) as tmp:
                data.DiskArray(tmp, (N, N, 3), fill=preset.background).close()
        canvas = data.DiskArray(stage_path(s)) if rank == 0 else None
        grid_stage(s, images.get(s - 1), canvas, journal, settings, preset, device, rank, world)
        images[s] = canvas

    # The slide: the last stage as a pyramidal BigTIFF, previews, a summary.
    if rank == 0:
        write_slide(args, settings, preset, images, journal, t_start)
        for img in images.values():
            img.close()
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return journal.state


def real_lower_stage(settings, preset, stage, path, work):
    """Stage `stage` of the real slide of --from: its region resized to N_stage exactly as
    training builds it (data.slide_cache: same region choice, same resize)."""
    N = cascade.stage_size(preset, stage)
    img = data.DiskArray(path, (N, N, 3))
    cache = data.slide_cache(settings.from_slide, preset, cache_dir=os.path.join(work, "from"))
    for r0 in range(0, N, 256):
        img.write(r0, 0, np.asarray(cache[f"stage{stage}"][r0:r0 + 256]))
    img.flush()
    img.close()


def parse_seeds(args):
    if args.n:
        return list(range(args.seed, args.seed + args.n))
    try:
        out = []
        for part in args.seeds.split(","):
            a, _, b = part.partition("-")
            out += list(range(int(a), int(b or a) + 1))
        return out
    except ValueError:
        fail(f"--seeds {args.seeds}: use a range such as 0-99 or a list such as 0,4,7")


def many_slides(args, device, rank, world):
    """One slide per seed, whole slides split across ranks (each rank alone on its slides). A
    slide with its record (OUT_s<seed>.tif.json) is skipped; an unfinished one resumes. Rank 0
    writes OUT.manifest.json: seed, path, settings, seconds, patches generated / filled, sha256."""
    seeds, (root, ext) = parse_seeds(args), os.path.splitext(args.out)
    if args.n is not None and args.n < 1:
        fail(f"--n {args.n}: use a value >= 1")
    records = []
    for seed in seeds[rank::world]:
        out = f"{root}_s{seed}{ext}"
        rec_path = out + ".json"
        if os.path.exists(rec_path) and os.path.exists(out):
            with open(rec_path) as f:
                records.append(json.load(f))
            print(f"{out}: done already, skipped", file=sys.stderr)
            continue
        one = argparse.Namespace(**{**vars(args), "out": out, "seed": seed, "seeds": None, "n": None, "resume": True})
        t0 = time.time()
        state = generate(one, device)
        count = lambda key: {s: len(v) for s, v in state[key].items()}
        rec = {"seed": seed, "path": os.path.abspath(out), "settings": state["settings"], "seconds": time.time() - t0,
               "patches": count("done"), "filled": count("filled"), "sha256": data.file_digest(out)}
        data.write_json(rec_path, rec, indent=1)
        records.append(rec)
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(records, parts, dst=0)
        records = [r for part in parts for r in part] if rank == 0 else records
    if rank == 0:
        data.write_json(args.out + ".manifest.json", sorted(records, key=lambda r: r["seed"]), indent=1)
        print(f"wrote {args.out}.manifest.json: {len(records)} slides", file=sys.stderr)


def one_line_errors(fn, *a):
    """Run fn; faults of the machine or of the models end with one line, not a traceback."""
    try:
        return fn(*a)
    except OSError as e:  # disk full (28), read-only file system (30), a vanished directory ...
        fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}; nothing written was lost "
             "(resume with --resume once the cause is fixed)")
    except FloatingPointError as e:
        fail(str(e))


if __name__ == "__main__":
    one_line_errors(main)
