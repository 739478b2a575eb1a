"""Generate a whole synthetic slide with URCDM and write it as a pyramidal BigTIFF.

    python sample.py --out slide.tif                  # the demo preset with the shipped models
    python sample.py --preset paper --ckpt CKPT_DIR --out slide.svs
    torchrun --nproc_per_node=8 sample.py ...          # each round's patches split across ranks
    python sample.py --preset paper --dry-run --out x.tif   # full geometry, cheap stand-in models
    python sample.py --from REAL.svs --start-stage 3 --out twin.tif   # zoom into a real slide
    python sample.py --n 100 --out synth/slide.tif     # 100 slides, synth/slide.tif.manifest.json

Read `sample_slide` first: the whole algorithm [PAPER Fig. 1] in one process and in memory.
Stage 1 generates the whole slide at N1 px; stages 2 and 3 each generate an overlapping grid of
patches, every patch conditioned on the stage below and on its finished neighbours (tiler.py).
`generate` is the same algorithm made to run for a day at paper size, with the same pixels: stage
images in files under OUT.work/ (never whole in memory), a journal of finished rounds so that
--resume continues a stopped run to the same slide (bit for bit on CPU), rounds split across
ranks, and the last stage written as an Aperio-style slide (data.write_aperio). Everything below
the "operations" banner (settings, journal, ranks, many slides, previews, main) serves it.

References
  [PAPER]     Cechnicka et al., URCDM, MICCAI 2024 (Sec. 2, Fig. 1).
"""
import argparse
import dataclasses
import fcntl
import functools
import json
import math
import os
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tifffile
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

import cascade
import data
import sde
import tiler
import unet as unet_mod

DEMO_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "demo")


# ----------------------------------------------------------------------------- the algorithm

def sample_slide(cdms, preset, sampling, *, seed=0, order="wavefront", batch=8,
                 white_threshold=data.MIN_TISSUE):
    """A whole slide [PAPER Fig. 1], in one process and in memory (the demo's 2048 px; not paper
    size, which `generate` streams to disk). cdms: {stage: cascade.CDM}; sampling: cascade.Sampling.
    Returns {stage: (N_s, N_s, 3) uint8}; the pixels `generate` writes with the same settings."""
    images = {}
    # Stage 1: the whole slide zoomed out, one CDM sample [PAPER Fig. 1, left].
    x = cdms[1].sample([tiler.patch_generator(seed, 1, 0, 0, cdms[1].device)],
                       sampling=sampling)  # (1, 3, N1, N1)
    images[1] = cascade.to_uint8(x)[0]
    # Stages 2-3: an overlapping grid of patches, each conditioned on the stage below (context,
    # region) and holding the pixels its finished neighbours fixed [PAPER Fig. 1, middle, right].
    for s in (2, 3):
        grid = cascade.stage_grid(preset, s, sampling.edge_margin)
        lower = tiler.Lower(images[s - 1], cascade.zoom(preset, s), preset.background)
        white = white_test(sampling, s, white_threshold)  # mostly glass: filled, not generated
        canvas = tiler.MemoryCanvas(grid.size, preset.background)
        tiler.generate_stage(functools.partial(cdms[s].sample, sampling=sampling), grid, canvas,
                             stage=s, seed=seed, order=order, batch=batch, lower=lower,
                             white=white,
                             feather=sampling.feather, device=cdms[s].device)
        images[s] = canvas.array
    return images


def white_test(sampling, stage, threshold):
    """Which patches of `stage` are filled from the stage below instead of generated: those less
    tissue than `threshold`, on the stages sampling.fill_white names [PAPER: mostly white patches
    at the highest magnification are ignored]; None where every patch is generated."""
    return tiler.WhiteTest(threshold, data.tissue_fraction) if stage in sampling.fill_white \
        else None


def generate(args, device, rank=0, world=1):
    """sample_slide made to run for a day at paper size, with the same pixels: each stage image a
    file under OUT.work/, a journal for --resume, rounds split across ranks (rank 0 alone reads
    and writes files). Returns the Journal (its state is rank 0's)."""
    t_start = time.time()
    settings, preset = resolve(args, device, rank)
    work, journal = open_work(args, settings, preset, rank, world)  # replays a half-written round
    path = lambda s: os.path.join(work, f"stage{s}.npy")
    images = {}
    # Stage 1, or (--from) a real slide's lower stage in place of the generated ones.
    if settings.start_stage == 1:
        images[1] = first_stage(settings, preset, journal, path(1), device, rank, world)
    elif settings.from_slide:
        s = settings.start_stage - 1
        images[s] = real_lower_stage(settings, preset, journal, s, path(s), rank, world)
    # Stages 2-3: patch grids, each conditioned on the stage below; with windows, only the
    # patches they depend on (needed_cells).
    cells = lambda windows, below=1: needed_cells(preset, settings.order,
                                                  settings.sampling.edge_margin, windows,
                                                  settings.stages, below)
    windows, need = settings.windows, cells(settings.windows)
    for s in need if rank == 0 else ():
        print(f"windows: stage {s}: {len(need[s])} of {cascade.stage_grid(preset, s).n ** 2} "
              "patches", file=sys.stderr)
    for s in range(max(settings.start_stage, 2), settings.stages + 1):
        if settings.patches and s == 3:  # random windows on the tissue of the finished stage 2
            windows = tissue_windows(images[2], settings, preset, rank, world)
            need = cells(windows, below=2)
            if rank == 0:
                print(f"--patches: {len(windows)} windows on tissue; stage 3: {len(need[3])} of "
                      f"{cascade.stage_grid(preset, 3).n ** 2} patches", file=sys.stderr)
        canvas = new_canvas(path(s), cascade.stage_size(preset, s), preset.background, rank,
                            fill=s not in need)  # a window's stage image stays sparse
        grid_stage(s, lower_img=images.get(s - 1), canvas=canvas, journal=journal,
                   settings=settings, preset=preset, device=device, rank=rank, world=world,
                   cells=need.get(s))
        images[s] = canvas
    # The slide: the last stage as a pyramidal BigTIFF, the lower stages as PNGs, a summary;
    # or the windows as PNGs with a manifest.
    if rank == 0:
        mpp = args.mpp or model_mpp(settings, preset, max(images))
        if settings.windows or settings.patches:
            write_windows(args.out, images, windows, settings, mpp, args.lower_windows,
                          whole=[s for s in images if s not in need])
        else:
            t_write = write_slide(args.out, images, mpp=mpp, compression=args.compression)
            report(args.out, images, settings, preset, journal, mpp, time.time() - t_start,
                   t_write)
        for img in images.values():
            img.close()
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return journal


def first_stage(settings, preset, journal, path, device, rank, world):
    """Stage 1: one CDM sample of the whole slide zoomed out, into the file `path` (rank 0)."""
    if not journal.done(1) and rank == 0:
        t0 = time.time()
        cdm = Timed(load_cdm(settings, preset, 1, device), settings.sampling)
        x = cdm([tiler.patch_generator(settings.seed, 1, 0, 0, device)])  # (1, 3, N1, N1)

        N1 = cascade.stage_size(preset, 1)
        img = data.DiskArray(path, (N1, N1, 3))
        img.write(0, 0, cascade.to_uint8(x)[0])
        img.flush()
        journal.mark(1, [((0, 0), None, False)], time.time() - t0, cdm.seconds)
    barrier(world)
    print(f"stage 1: {cascade.stage_size(preset, 1)} px done", file=sys.stderr)
    return data.DiskArray(path) if rank == 0 else None


def grid_stage(stage, *, lower_img, canvas, journal, settings, preset, device, rank, world,
               cells=None):
    """Stage 2 or 3: the patch grid, round by round (tiler.plan). Rank 0 reads each batch's inputs
    and sends every rank its share, gathers the results, saves the round, writes it into the
    stage image and marks it in the journal; other ranks only compute (lower_img, canvas: None).
    Rank 0's slow file work is off the ranks' path: a round's inputs from the stage below are read
    while the round before computes (`reader`), and a round is synced and marked done while the
    next computes (`writer`). Only the known pixels wait for the previous round.
    cells: the patches to generate (a window's closure), None = all."""
    S, sp = settings, settings.sampling
    grid = cascade.stage_grid(preset, stage, sp.edge_margin)
    lower = None if S.outpaint or rank else tiler.Lower(lower_img, cascade.zoom(preset, stage),
                                                        preset.background)
    white = white_test(sp, stage, S.white_threshold) if lower else None
    sample_fn = Timed(load_cdm(S, preset, stage, device), sp)
    journal.share(world)
    skip = [] if cells is None else [(i, j) for i in range(grid.n) for j in range(grid.n)
                                     if (i, j) not in cells]
    todo = tiler.plan(S.order, grid.n, S.batch, journal.done(stage) + skip)
    left = [c for rnd in todo for b in rnd for c in b]
    n_fill = sum(white(lower, *grid.origin(*c), grid.patch) for c in left) if white else 0
    meter = Progress(stage, journal, grid.n ** 2 - len(skip), n_fill)
    below = lambda rnd: [tiler.lower_inputs(grid, batch, lower, white) for batch in rnd]
    read = lambda batch, low: tiler.read_batch(grid, canvas, batch, lower=lower, below=low)

    def finish(results, seconds, model_seconds):  # in the writer: on disk, then in the journal
        canvas.flush()
        journal.mark(stage, results, seconds, model_seconds)
        meter.update(results)

    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        ahead = reader.submit(below, todo[0]) if todo and rank == 0 else None
        written = None
        for k, rnd in enumerate(todo):
            t_round, sample_fn.seconds = time.time(), 0.0
            # Read ahead: the next round's inputs from the stage below, while this one computes.
            lows = ahead.result() if rank == 0 else None
            if rank == 0 and k + 1 < len(todo):
                ahead = reader.submit(below, todo[k + 1])
            # Generate: this rank's batches of the round.
            results = [r for raw in my_batches(rnd, lows, read, rank, world)
                       for r in tiler.run_batch(sample_fn, tiler.float_inputs(grid, raw, S.order),
                                                stage=stage, seed=S.seed, feather=sp.feather,
                                                device=device)]
            results = gather(results, rank, world)
            # Write: rank 0 saves the round whole, writes it into the stage image (the next
            # round's known pixels), then syncs and marks it done in the background.
            if rank == 0:
                if written:
                    written.result()  # the previous round is marked done, its round file gone
                journal.stage_round(stage, results)
                write_round(canvas, grid, results)
                written = writer.submit(finish, results, time.time() - t_round, sample_fn.seconds)

        if written:
            written.result()
    barrier(world)


def write_round(canvas, grid, results):
    """A round's patches into the stage image."""
    for (i, j), pixels, _ in results:
        canvas.write(*grid.origin(i, j), pixels)


def apply(canvas, grid, results):
    """A round's patches into the stage image, then flushed: on disk before the journal says so."""
    write_round(canvas, grid, results)
    canvas.flush()


def write_slide(out, images, *, mpp, compression):
    """The last stage as the slide OUT (temp name, then rename), the lower stages as
    OUT.stage{s}.png (for metrics.py: magnifications 0-1). Returns the seconds it took."""
    t0, final = time.time(), max(images)
    with data.atomic_path(out) as tmp:
        data.write_aperio(tmp, images[final], mpp=mpp, compression=compression,
                          workdir=out + ".work")
    for s in sorted(images)[:-1]:
        with data.atomic_path(f"{out}.stage{s}.png") as tmp:
            Image.fromarray(np.asarray(images[s][:])).save(tmp, format="PNG")
    return time.time() - t0


# ----------------------------------------------------------------------------- windows

def needed_cells(preset, order, margin, windows, last=3, below=1):
    """{stage: the patches that `windows` (stage-`last` px) depend on} (tiler.closure), from the
    last stage down to the stage above `below`; {} for the whole slide. Stage 1 is always whole."""
    need = {}
    rects = [(y, y + h, x, x + w) for x, y, w, h in windows]
    for s in range(last, below, -1) if windows else ():
        grid = cascade.stage_grid(preset, s, margin)
        need[s] = tiler.closure(grid, order, rects)
        rects = tiler.lower_rects(grid, need[s], cascade.zoom(preset, s),
                                  cascade.stage_size(preset, s - 1))
    return need


def tissue_windows(stage2, settings, preset, rank, world, tries=100):
    """--patches: settings.patches windows of settings.patch_size px at random final-stage
    positions, drawn from the seed, kept where the stage-2 field under them is tissue (at least
    --white-threshold, the rule for 'mostly white'): glass is never generated. Rank 0 draws,
    every rank gets them."""
    S, out = settings, []
    if rank == 0:
        rng = np.random.default_rng(sde.derive_seed("windows", S.seed))
        N3, size = cascade.stage_size(preset, 3), S.patch_size
        r = N3 / cascade.stage_size(preset, 2)  # final px per stage-2 px
        for _ in range(tries * S.patches):
            x, y = (int(v) for v in rng.integers(0, N3 - size + 1, 2))
            field = stage2[int(y / r):math.ceil((y + size) / r),
                           int(x / r):math.ceil((x + size) / r)]
            if data.tissue_fraction(np.asarray(field)) >= max(S.white_threshold, 1e-9):
                out.append((x, y, size, size))
                if len(out) == S.patches:
                    break
        if len(out) < S.patches:
            print(f"--patches {S.patches}: only {len(out)} windows on tissue found in "
                  f"{tries * S.patches} draws", file=sys.stderr)
    if world > 1:
        box = [out]
        dist.broadcast_object_list(box, src=0)
        out = box[0]
    return tuple(out)


def window_files(out, x, y):
    """The file of the window at (x, y) (final-stage px), beside OUT: OUT_x<X>_y<Y>.png."""
    return f"{os.path.splitext(out)[0]}_x{x}_y{y}"


def write_windows(out, images, windows, settings, mpp, lower_windows, whole):
    """Each window of the final stage as a PNG (with --lower-windows, its field in each lower
    stage too), the lower stages generated whole as OUT.stage<s>.png (for metrics.py's
    magnifications 0-1), and OUT.windows.json: a manifest a patch dataset loads (file, x, y, w, h,
    stage, um/px; the run's seed and settings)."""
    last, records = max(images), []
    save = lambda arr, path: Image.fromarray(np.asarray(arr)).save(path, format="PNG")
    for x, y, w, h in windows:
        root = window_files(out, x, y)
        rec = {"file": os.path.basename(root) + ".png", "x": x, "y": y, "w": w, "h": h,
               "stage": last, "mpp": mpp, "lower": {}}
        with data.atomic_path(root + ".png") as tmp:
            save(images[last].read(y, x, h, w), tmp)
        for s in sorted(images)[:-1] if lower_windows else ():
            r = images[last].shape[0] / images[s].shape[0]  # final px per stage-s px
            y0, x0 = int(y / r), int(x / r)
            y1, x1 = max(math.ceil((y + h) / r), y0 + 1), max(math.ceil((x + w) / r), x0 + 1)
            with data.atomic_path(f"{root}_stage{s}.png") as tmp:
                save(images[s][y0:y1, x0:x1], tmp)
            rec["lower"][str(s)] = {"file": f"{os.path.basename(root)}_stage{s}.png",
                                    "box": [x0, y0, x1 - x0, y1 - y0]}
        records.append(rec)
    stages = {}
    for s in sorted(s for s in whole if s < last):
        with data.atomic_path(f"{out}.stage{s}.png") as tmp:
            save(images[s][:], tmp)
        stages[str(s)] = f"{os.path.basename(out)}.stage{s}.png"
    data.write_json(f"{out}.windows.json", {"format": "urcdm-windows-v1", "seed": settings.seed,
                                            "stages": stages, "settings": _plain(settings),
                                            "windows": records}, indent=1)
    print(f"wrote {len(records)} windows beside {out} and {out}.windows.json", file=sys.stderr)


# ============================================================================= operations

# Settings, journal, ranks, models, progress, previews, many slides, main: what makes
# `generate` robust and fast. None of it changes a pixel.

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
    white_threshold: float      # 'mostly white': less tissue than this (stages in fill_white)
    outpaint: bool              # stage 3 from its neighbours only (the paper's baseline)
    dry_run: bool               # cheap stand-in models
    precision: str              # fp32 or bf16 (resolved from auto)
    sampling: cascade.Sampling  # the preset's, with the flags that override it
    models: dict                # {file name: sha256} of the model files used ({} for --dry-run)
    ckpt: str                   # the model directory, resolved
    from_slide: str = ""        # --from: a real slide whose lower stage is used ("" = none)
    start_stage: int = 1        # the first stage generated (1; 2-3 with --from; 3 for --outpaint)
    windows: tuple = ()         # --window: ((x, y, w, h), ...) in final-stage px; () = the slide
    patches: int = 0            # --patches: that many random windows on tissue (0 = none)
    patch_size: int = 0         # their side, final-stage px


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None,
                    help="output slide (.tif or .svs): Aperio-style pyramidal BigTIFF (required "
                         "except with --estimate)")
    ap.add_argument("--ckpt", default=None,
                    help=f"directory with stage{{s}}_level{{l}}.pt (default: {DEMO_CKPT})")
    ap.add_argument("--preset", default="demo",
                    help=f"geometry, models and defaults: {', '.join(cascade.PRESETS)}")
    ap.add_argument("--seed", type=int, default=0,
                    help="the slide's seed; every patch's noise derives from it")
    g = ap.add_argument_group("sampling (default: the preset's)")
    g.add_argument("--sampler", default=None, choices=sde.SAMPLERS, help="step rule")
    g.add_argument("--steps", type=int, nargs="+", default=None, metavar="N",
                   help="steps per level (3 values), or per stage and level (9: stage 1's levels "
                        "0-2, stage 2's, stage 3's)")
    g.add_argument("--eta", type=float, default=None,
                   help="DDIM's noise scale (0 = deterministic, 1 = ancestral)")
    g.add_argument("--threshold", type=float, default=None,
                   help="dynamic thresholding quantile of x0_hat (0 = off)")
    g.add_argument("--resample", type=int, default=None,
                   help="RePaint resampling jumps per step (1 = off)")
    g.add_argument("--aug-level", type=float, default=None,
                   help="conditioning augmentation level t_aug")
    g.add_argument("--edge-margin", type=int, default=None,
                   help="px at a patch's inner edges that the next patch redraws (0 = hold the "
                        "whole overlap, as the paper)")
    g.add_argument("--feather", type=int, default=None,
                   help="px over which known pixels fade into the new patch (0 = pasted exactly, "
                        "as the paper)")
    g.add_argument("--fill-white", type=int, nargs="*", default=None, choices=[2, 3],
                   metavar="STAGE",
                   help="stages whose mostly-white patches are filled from the stage below (none: "
                        "generate all)")
    ap.add_argument("--white-threshold", type=float, default=data.MIN_TISSUE,
                    help="'mostly white': a region less tissue than this (default data.MIN_TISSUE, "
                         "training's rule)")
    ap.add_argument("--order", default=None, choices=tiler.ORDERS,
                    help="raster (the paper); wavefront (136 rounds at paper size; the same slide "
                         "as raster at --batch 1, and with any batch up to float rounding); "
                         "checkerboard (4 rounds, another slide; cheap windows). Default: the "
                         "preset's (paper_plus: checkerboard; others: wavefront)")
    ap.add_argument("--batch", type=int, default=None,
                    help="patches per U-Net batch (default: 1 at 1024 px patches, where one patch "
                         "fills a GPU and every rank of a round gets work; 8 below); a run's slide "
                         "depends on it up to float rounding, never on the number of ranks")
    ap.add_argument("--stages", type=int, default=3, choices=[1, 2, 3],
                    help="stop after this stage")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run (OUT.work/)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing --out and discard OUT.work/")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="U-Net arithmetic: auto = bf16 autocast on CUDA and on CPUs with native "
                         "bf16, else fp32")
    ap.add_argument("--mpp", type=float, default=None,
                    help="microns per pixel of the final stage (default: from the models' training "
                         "slides)")
    ap.add_argument("--compression", default="jpeg", choices=["jpeg", "zlib"],
                    help="tile compression")
    ap.add_argument("--outpaint", action="store_true",
                    help="the outpainting baseline: stage 3 without the stage below")
    ap.add_argument("--from", dest="from_slide", default=None, metavar="SLIDE",
                    help="zoom into a real slide: its lower stage, built as training builds it, "
                         "replaces the generated one")
    ap.add_argument("--start-stage", type=int, default=None, choices=[2, 3],
                    help="with --from: the first stage to generate (2: from the slide's stage-1 "
                         "image; 3: from its stage 2)")
    ap.add_argument("--seeds", default=None,
                    help="many slides: '0-99' or '0,4,7'; OUT gets _s<seed> before its suffix")
    ap.add_argument("--n", type=int, default=None, help="many slides: N seeds from --seed on")
    ap.add_argument("--dry-run", action="store_true",
                    help="cheap deterministic stand-in for the U-Nets (no checkpoints)")
    g = ap.add_argument_group("estimate (prints the cost of a slide, generates nothing)")
    g.add_argument("--estimate", action="store_true",
                   help="patches, rounds, rank utilisation, FLOPs and wall time per stage")
    g.add_argument("--gpus", type=int, default=8, help="GPUs (ranks) of the estimate")
    g.add_argument("--mfu", type=float, default=0.4,
                   help="share of the GPU's peak the U-Nets reach")
    g.add_argument("--tflops", type=float, default=312.0,
                   help="the GPU's bf16 dense peak, TFLOP/s (A100: 312)")
    g = ap.add_argument_group("windows (crops of the final slide; only the patches they depend on "
                              "are generated, and they hold exactly the slide's pixels)")
    g.add_argument("--window", type=int, nargs=4, action="append", default=None,
                   metavar=("X", "Y", "W", "H"),
                   help="a window in final-stage px (repeat for several): OUT_x<X>_y<Y>.png")
    g.add_argument("--patches", type=int, default=0,
                   help="N windows at random positions on tissue (after stage 2, from the seed)")
    g.add_argument("--patch-size", type=int, default=None,
                   help="side of the --patches windows, px (default: the preset's patch)")
    g.add_argument("--lower-windows", action="store_true",
                   help="also write each window's field in the lower stages (OUT_x.._stage<s>.png)")
    ap.add_argument("--keep-work", action="store_true",
                    help="keep OUT.work/ (stage images, journal) at the end")
    args = ap.parse_args(argv)
    if args.out is None and not args.estimate:
        ap.error("the following arguments are required: --out")
    return args



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
    windows, patch_size = check_windows(args, preset, max(stages))
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cascade.native_bf16(device))
    return Settings(preset=preset.name, seed=args.seed, stages=max(stages), order=sampling.order,
                    batch=args.batch or default_batch(preset), white_threshold=args.white_threshold,
                    outpaint=args.outpaint, dry_run=args.dry_run,
                    precision="bf16" if bf16 else "fp32", sampling=sampling, models=models,
                    ckpt=ckpt, start_stage=start,
                    from_slide=os.path.realpath(args.from_slide) if args.from_slide else "",
                    windows=windows, patches=args.patches, patch_size=patch_size), preset


# Rank 0's file work that a round waits for, per patch of the round (known pixels read and sent,
# floats made, the round saved and written: tests/bench_sample.py --io, 1.15 s for a 23-patch paper
# round on a 2-core CPU); the rest of its file work runs beside the GPUs (reader, writer threads).
HOST_S_PER_PATCH = 0.05


def patch_flops(preset, sampling, stage):
    """FLOP of one patch of `stage`: its three levels at their sizes and steps."""
    return sum(unet_mod.flops(cascade.unet_config(preset, stage, lvl), L)
               * sampling.level_steps(stage, lvl) for lvl, L in enumerate(preset.level_sizes))


def stage_costs(preset, sampling, order, batch, world, need=None):
    """Per stage (1, 2, 3): (patches, rounds, share of rank time busy, FLOP, FLOP a patch, rank
    time in patch-times) when `world` ranks share each round; need: {stage: cells} (windows)."""
    rows = []
    for s in (1, 2, 3):
        n, cells = preset.n_patches[s - 1], (need or {}).get(s)
        skip = [] if cells is None else [(i, j) for i in range(n) for j in range(n)
                                         if (i, j) not in cells]
        loads = tiler.rank_loads(tiler.plan(order, n, batch, skip), world) if s > 1 else [1]
        k, flop = n * n - len(skip), patch_flops(preset, sampling, s)
        rows.append((k, len(loads), k / (world * max(sum(loads), 1)), k * flop, flop, sum(loads)))
    return rows


def estimate(args):
    """--estimate: per stage the patches, rounds, rank utilisation, FLOPs and wall time on --gpus
    GPUs at --mfu of --tflops, with rank 0's measured file work; arithmetic, no model loaded.
    With --window / --patches: what those windows cost (--patches: uniform random positions, as
    the tissue is not known before stage 2)."""
    p = cascade.get_preset(args.preset)
    sp, batch, W = resolve_sampling(args, p), args.batch or default_batch(p), args.gpus
    rate = args.tflops * 1e12 * args.mfu  # FLOP/s of one GPU
    windows, size = check_windows(args, p, 3)
    if args.patches:
        rng = np.random.default_rng(sde.derive_seed("windows", args.seed))
        xy = rng.integers(0, cascade.stage_size(p, 3) - size + 1, (args.patches, 2))
        windows = [(int(x), int(y), size, size) for x, y in xy]
    need = needed_cells(p, sp.order, sp.edge_margin, windows, below=2 if args.patches else 1)
    print(f"{p.name}: order {sp.order}, batch {batch}, {W} GPUs at {args.mfu:.0%} of "
          f"{args.tflops:g} TFLOP/s; every patch generated (glass filled instead only shortens it)"
          + (f"; {len(windows)} windows" if windows else ""))
    print("stage  patches  rounds  ranks busy    PFLOP  s a patch   wall h")
    rows = stage_costs(p, sp, sp.order, batch, W, need)
    total_s = 0.0
    for s, (k, n_rounds, busy, flop, one, load) in enumerate(rows, 1):
        seconds = load * one / rate + (k * HOST_S_PER_PATCH if s > 1 else 0)
        total_s += seconds
        print(f"{s:5d} {k:8d} {n_rounds:7d} {busy:10.1%} {flop / 1e15:8.1f} {one / rate:10.1f} "
              f"{seconds / 3600:8.2f}")
    total = sum(r[3] for r in rows)
    whole = sum(r[3] for r in stage_costs(p, sp, sp.order, batch, W)) if windows else total
    print(f"slide {'':24s} {total / 1e15:8.1f} {'':10s} {total_s / 3600:8.2f}  "
          f"({total_s / 60:.0f} min" + (f"; {total / whole:.1%} of the whole slide's FLOPs)"
                                         if windows else ")"))
    print(f"host: {HOST_S_PER_PATCH} s a patch of rank 0's file work on the ranks' path "
          "(included); a step's host work (under 1 ms: tests/bench_sample.py) runs ahead of "
          "the GPU")


def default_batch(preset):

    """Patches per U-Net batch when --batch is not given: 1 at GPU-filling sizes (1024 px), so
    that a round's patches spread over every rank (batches are cut before ranks take their
    share); 8 for small patches (the CPU demo)."""
    return 1 if preset.patch >= 1024 else 8


def check_windows(args, p, last):
    """--window / --patches: windows inside the final stage. Returns (windows, patch size)."""
    N, windows = cascade.stage_size(p, last), tuple(tuple(w) for w in args.window or ())
    for x, y, w, h in windows:
        if not (w >= 1 and h >= 1 and 0 <= x and x + w <= N and 0 <= y and y + h <= N):
            fail(f"--window {x} {y} {w} {h}: must lie inside the {N} x {N} px stage {last} image")
    size = args.patch_size or p.patch
    if args.patches and (args.patches < 0 or windows or not 1 <= size <= N or last != 3):
        fail(f"--patches {args.patches}: use N >= 1, without --window, with --patch-size 1 to {N} "
             "and --stages 3")
    return windows, size if args.patches else 0


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
        fail(f"--from {args.from_slide}: {W} x {H} px is smaller than preset {p.name}'s {N3} px "
             "region; use a larger slide or another preset")
    return start



def resolve_sampling(args, p):
    """The preset's Sampling with the flags that override it, each flag checked."""
    sp = p.sampling
    checks = [("--batch", args.batch, args.batch is None or args.batch >= 1, ">= 1"),
              ("--steps", args.steps,
               args.steps is None or (len(args.steps) in (3, 9) and min(args.steps) >= 1),
               "list of 3 (per level) or 9 (per stage and level), each >= 1"),
              ("--resample", args.resample, args.resample is None or args.resample >= 1, ">= 1"),
              ("--eta", args.eta, args.eta is None or args.eta >= 0, ">= 0"),
              ("--threshold", args.threshold,
               args.threshold is None or 0 <= args.threshold <= 1, "in [0, 1]"),
              ("--aug-level", args.aug_level,
               args.aug_level is None or 0 <= args.aug_level <= 1, "in [0, 1]"),
              ("--white-threshold", args.white_threshold,
               0 <= args.white_threshold <= 1, "in [0, 1]"),
              ("--mpp", args.mpp, args.mpp is None or args.mpp > 0, "> 0 (microns per pixel)"),
              ("--feather", args.feather,
               args.feather is None or 0 <= args.feather <= p.patch // 16,
               f"in 0 .. {p.patch // 16} px for preset {p.name} (half its {p.patch // 8} px "
               "overlap)")]
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
        sp, steps=tuple(pick(args.steps, sp.steps)), sampler=pick(args.sampler, sp.sampler),
                               eta=pick(args.eta, sp.eta),
        threshold=sp.threshold if args.threshold is None else (args.threshold or None),
        resample=pick(args.resample, sp.resample), aug_level=pick(args.aug_level, sp.aug_level),
        edge_margin=margin, feather=pick(args.feather, sp.feather),
        fill_white=tuple(pick(args.fill_white, sp.fill_white)), order=pick(args.order, sp.order))



def check_models(args, p, stages):
    """The model directory (resolved) and {file: sha256} of the files the stages need; each file's
    identity is checked now, cheaply (mmap: no weights read), not after hours of work."""
    ckpt = os.path.realpath(args.ckpt or DEMO_CKPT)
    if not os.path.isdir(ckpt):
        fail(f"--ckpt {ckpt}: no such directory. Train the nine models with train.py (README, "
             "'Training') or pass --dry-run to try the pipeline without models")
    names = [cascade.model_filename(s, lvl) for s in stages for lvl in range(3)]
    for n in names:
        path, (s, lvl) = os.path.join(ckpt, n), (int(n[5]), int(n[12]))
        if not os.path.isfile(path):
            fail(f"--ckpt {ckpt}: missing model file {n}; train it with `python train.py --preset "
                 f"{p.name} --stage {s} --level {lvl}` or point --ckpt elsewhere")
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
        fail(f"--out {args.out} is a directory; give a file name such as "
             f"{os.path.join(args.out, 'slide.tif')}")
    folder = os.path.dirname(out)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        fail(f"--out {args.out}: cannot write into {folder} (missing or read-only)")
    sizes = [3 * cascade.stage_size(p, s) ** 2 for s in stages]  # stage images, pyramid temps,
    if args.window or args.patches:                              #   slide; windows: a closure
        sizes[-1] = min(sizes[-1], 3 * p.patch ** 2 * 50 * max(len(args.window or ()),
                                                             args.patches))
    need = sum(sizes) * 1.4
    free = shutil.disk_usage(folder).free
    if free < need and not args.resume:
        fail(f"--out {args.out}: this run needs about {need / 1e9:.1f} GB in {folder}, "
             f"{free / 1e9:.1f} GB are free")



def fail(msg):
    sys.exit(f"error: {msg}")


# ----------------------------------------------------------------------------- the journal

class Journal:
    """OUT.work/journal.json: the run's settings and its finished patches, so that --resume
    continues where a run stopped. A round's results are first saved whole (round.npz), then
    written to the stage image, then marked done: a run killed in between re-applies the saved
    round (replay) instead of regenerating from a half-written image."""

    def __init__(self, work, settings):
        self.work = work
        self.path = os.path.join(work, "journal.json")
        self.round_path = os.path.join(work, "round.npz")
        self.state = {"settings": _plain(settings), "done": {}, "filled": {}, "seconds": {},
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
        old, new = self.state["settings"], _plain(settings)
        return [(k, old.get(k), new[k]) for k in new if old.get(k) != new[k]]

    # saving
    def save(self):
        data.write_json(self.path, self.state)

    def load(self):
        with open(self.path) as f:
            self.state = json.load(f)

    def share(self, world):
        """Rank 0's state to every rank: only rank 0 reads or writes files, so ranks on other
        machines need no shared file system."""
        if world > 1:
            state = [self.state]
            dist.broadcast_object_list(state, src=0)
            self.state = state[0]

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
            canvas = data.DiskArray(os.path.join(self.work, f"stage{s}.npy"))
            apply(canvas, cascade.stage_grid(preset, s, self.settings()["sampling"]["edge_margin"]),
                  results)
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


def _plain(settings):
    """Settings as plain JSON types (what the journal holds and compares)."""
    return json.loads(json.dumps(dataclasses.asdict(settings)))


def open_work(args, settings, preset, rank, world):
    """OUT.work/ with its journal, locked for this run (rank 0 holds an exclusive lock; the lock
    file stays open with the journal). A run with finished patches is continued only with --resume
    (first re-applying a round it saved but did not mark) and discarded only with --overwrite; a
    work directory without any finished patch never blocks a fresh start.
    Returns (work, journal)."""
    work = args.out + ".work"
    journal = Journal(work, settings)
    if rank == 0:
        if os.path.exists(args.out) and not args.overwrite:
            fail(f"--out {args.out} exists; pass --overwrite to replace it")
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
            lock, journal = journal.lock, Journal(work, settings)
            journal.lock = lock
            journal.save()
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


def new_canvas(path, N, background, rank, fill=True):
    """The (N, N, 3) stage image file of a grid stage (rank 0; None elsewhere), created once;
    filled with the background, or (fill=False, for windows) left sparse: no bytes on disk."""
    if rank:
        return None
    if not os.path.exists(path):
        with data.atomic_path(path) as tmp:
            data.DiskArray(tmp, (N, N, 3), fill=background if fill else None).close()

    return data.DiskArray(path)


def real_lower_stage(settings, preset, journal, stage, path, rank, world):
    """Stage `stage` of the real slide of --from: its region resized to N_stage exactly as
    training builds it (data.slide_cache: same region choice, same resize)."""
    if not journal.done(stage) and rank == 0:
        t0, N = time.time(), cascade.stage_size(preset, stage)
        img = data.DiskArray(path, (N, N, 3))
        cache = data.slide_cache(settings.from_slide, preset,
                                 cache_dir=os.path.join(journal.work, "from"))
        for r0 in range(0, N, 256):
            img.write(r0, 0, np.asarray(cache[f"stage{stage}"][r0:r0 + 256]))
        img.flush()
        img.close()
        journal.mark(stage, [((0, 0), None, False)], time.time() - t0)
    barrier(world)
    print(f"stage {stage}: taken from {settings.from_slide}", file=sys.stderr)
    return data.DiskArray(path) if rank == 0 else None


# ----------------------------------------------------------------------------- ranks

def barrier(world):
    if world > 1:
        dist.barrier()


def my_batches(rnd, lows, read, rank, world):
    """This rank's batches of a round as tiler.RawBatch: every world-th batch, read by rank 0
    (read(cells, low), low: the batch's inputs from the stage below, already read) and scattered
    (read lazily in one process)."""
    if world == 1:
        return (read(b, low) for b, low in zip(rnd, lows))
    mine = [None]
    shares = ([[read(b, low) for b, low in zip(rnd[r::world], lows[r::world])]
               for r in range(world)] if rank == 0 else None)

    dist.scatter_object_list(mine, shares, src=0)
    return mine[0]


def gather(results, rank, world):
    """Every rank's results of a round, on rank 0 (None elsewhere)."""
    if world == 1:
        return results
    parts = [None] * world if rank == 0 else None
    dist.gather_object(results, parts, dst=0)
    return [r for part in parts for r in part] if rank == 0 else None


# ----------------------------------------------------------------------------- models

class DryRunCDM:
    """A cheap deterministic stand-in for a stage's CDM (--dry-run): the upsampled region of
    the stage below plus seeded noise (stage 1: a smooth seeded tissue-like field). It keeps
    the known pixels, so the whole pipeline (geometry, I/O, resume, ranks) runs for real."""

    def __init__(self, preset, stage):
        self.preset, self.stage = preset, stage

    def sample(self, generators, *, known=None, mask=None, context=None, region=None, **_):
        P, f32 = self.preset.patch, torch.float32
        noise = sde.randn((len(generators), 3, P, P), generators)  # on the CPU
        if region is None:  # stage 1: blobs of pink tissue on white glass
            low = torch.stack([sde.draw(torch.rand, (1, 6, 6), g, "cpu", f32) for g in generators])

            t = torch.nn.functional.interpolate(low, size=(P, P), mode="bicubic",
                                                align_corners=False)
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
        return cascade.load_cdm(settings.ckpt, preset, stage, device,
                                bf16=settings.precision == "bf16")
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
            raise FloatingPointError("the model produced non-finite pixels (NaN or inf): its "
                                     "weights are broken; retrain or re-export it")
        return x



# ----------------------------------------------------------------------------- progress and report

class Progress:
    """One line per round on stderr: patches done, generated / filled; ETA from the generation
    rate alone (a filled patch costs next to nothing)."""

    def __init__(self, stage, journal, n_total, n_fill):
        self.stage, self.journal, self.n_total, self.n_fill = stage, journal, n_total, n_fill
        self.t0 = time.time()
        self.generated0 = len(journal.done(stage)) - len(journal.filled(stage))

    def update(self, results):
        self.n_fill -= sum(f for _, _, f in results)
        done, filled = len(self.journal.done(self.stage)), len(self.journal.filled(self.stage))
        generated = done - filled
        rate = (generated - self.generated0) / max(time.time() - self.t0, 1e-9)
        left = self.n_total - done - self.n_fill
        eta = f"ETA {left / rate / 60:.1f} min" if rate > 0 else "ETA -"
        print(f"stage {self.stage}: {done}/{self.n_total} patches ({generated} generated, {filled} "
              f"filled as glass); left: {left} to generate, {self.n_fill} to fill; {rate:.2f} "
              f"generated patches/s, {eta}", file=sys.stderr, flush=True)


def report(out, images, settings, preset, journal, mpp, seconds, t_write):
    """The previews, each grid stage's seam score, and a summary on stderr."""
    previews = write_previews(out, images, preset)
    grid = lambda s: cascade.stage_grid(preset, s, settings.sampling.edge_margin)
    seams = {s: tiler.seam_score(images[s],
                                 grid(s), settings.order) for s in sorted(images) if s > 1}
    final = images[max(images)]
    lines = [f"wrote {out}: {final.shape[1]} x {final.shape[0]} px at {mpp:.4g} um/px, "
             f"{os.path.getsize(out) / 1e6:.1f} MB, {seconds / 60:.1f} min in this run"]
    for s, (n, filled, secs, model) in journal.stages().items():
        lines.append(f"  stage {s}: {n} patches in {secs:.1f} s ({n - filled} generated, {filled} "
                     "filled as glass); outside the model "
                     f"{(secs - (model or secs)) / max(n, 1):.3f} s/patch (rank 0)")
    if seams:
        lines.append("  seam score (1.0 = invisible): "
                     + ", ".join(f"stage {s} {v:.3f}" for s, v in seams.items()))
    lower = [f"{out}.stage{s}.png" for s in sorted(images)[:-1]]
    lines.append(f"  pyramid written in {t_write:.1f} s; "
                 f"previews{' and lower stages' if lower else ''}: {', '.join(previews + lower)}")
    print("\n".join(lines), file=sys.stderr)


def model_mpp(settings, preset, stage):
    """Microns per pixel of a stage: the training slides' (carried in the model files) times
    the zoom from that stage to stage 3. 0.25 (40x) when the models do not say (--dry-run)."""
    mpp3 = 0.25
    if settings.models:
        path = os.path.join(settings.ckpt, sorted(settings.models)[-1])
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # no weights read
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
            ImageDraw.Draw(im).rectangle([box[0], box[0], box[1], box[1]],
                                         outline=(0, 90, 255), width=3)
        panels.append(im)
    fig = Image.new("RGB", (len(panels) * (side + 8), side), "white")
    for k, im in enumerate(panels):
        fig.paste(im, (k * (side + 8), 0))
    paths = [out + ".preview.png", out + ".thumbnail.png"]
    fig.save(paths[0])
    with tifffile.TiffFile(out) as tif:  # the slide's smallest level: never the whole canvas

        smallest = tif.series[0].levels[-1].asarray()
    _fit(smallest.reshape(smallest.shape[-3:]), 1024).save(paths[1])
    return paths



# ----------------------------------------------------------------------------- many slides

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
    """One slide per seed, whole slides split across ranks (each rank alone on its slides, in its
    own machine's file system). A slide with its record (OUT_s<seed>.tif.json) is skipped; an
    unfinished one resumes. Rank 0 writes OUT.manifest.json, one record per slide: seed, host (the
    machine that holds the slide), path, settings, seconds, patches generated / filled, sha256."""
    seeds, (root, ext) = parse_seeds(args), os.path.splitext(args.out)
    if args.n is not None and args.n < 1:
        fail(f"--n {args.n}: use a value >= 1")
    records = []
    for seed in seeds[rank::world]:
        out = f"{root}_s{seed}{ext}"
        rec_path = out + ".json"
        product = f"{out}.windows.json" if args.window or args.patches else out  # what is kept
        if os.path.exists(rec_path) and os.path.exists(product):
            with open(rec_path) as f:
                records.append(json.load(f))
            print(f"{out}: done already, skipped", file=sys.stderr)
            continue
        one = argparse.Namespace(**{**vars(args), "out": out, "seed": seed, "seeds": None,
                                    "n": None, "resume": True})
        t0 = time.time()
        journal = generate(one, device)
        stages = journal.stages()
        rec = {"seed": seed, "host": socket.gethostname(), "rank": rank,
               "path": os.path.abspath(product), "settings": journal.settings(),
               "seconds": time.time() - t0,
               "patches": {str(s): v[0] for s, v in stages.items()},
               "filled": {str(s): v[1] for s, v in stages.items()},
               "sha256": data.file_digest(product)}
        data.write_json(rec_path, rec, indent=1)
        records.append(rec)
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(records, parts, dst=0)
        records = [r for part in parts for r in part] if rank == 0 else records
    if rank == 0:
        hosts = sorted({r["host"] for r in records})
        data.write_json(args.out + ".manifest.json",
                        sorted(records, key=lambda r: r["seed"]), indent=1)
        print(f"wrote {args.out}.manifest.json: {len(records)} slides on {len(hosts)} machine(s) "
              f"({', '.join(hosts)}); each slide stays on the machine that made "
              "it", file=sys.stderr)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    if args.estimate:
        return estimate(args)
    ddp, rank, world, device = cascade.init_distributed(args.device)
    if args.seeds or args.n:
        many_slides(args, device, rank, world)
    else:
        generate(args, device, rank, world)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def one_line_errors(fn, *a):
    """Run fn; faults of the machine or of the models end with one line, not a traceback."""
    try:
        return fn(*a)
    except OSError as e:  # disk full (28), read-only file system (30), a vanished directory ...
        fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}; nothing written was "
             "lost (resume with --resume once the cause is fixed)")
    except FloatingPointError as e:
        fail(str(e))


if __name__ == "__main__":
    one_line_errors(main)
