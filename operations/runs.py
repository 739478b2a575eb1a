"""The streamed run behind sample.py: sample.sample_slide's algorithm with the same pixels, made
to run for a day at paper size. Each stage image is a file under OUT.work/ (never whole in memory),
a journal of finished rounds lets --resume continue a stopped run to the same slide, rounds are
split across ranks (rank 0 alone reads and writes files); windows and --from (zooms into real
slides) are served here, many slides in operations/many.py."""
import functools
import glob
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

import cascade
import data
import sde
import tiler
from operations import checkpoints, transfer, windows
from operations.aperio import DiskArray, write_aperio
from operations.distributed import barrier, gather, scatter_batches
from operations.files import atomic_path, remove_orphans
from operations.flags import fail
from operations.settings import resolve
from operations.journal import open_work, write_round
from operations.logs import Progress
from operations.previews import slide_previews


class SlideSkipped(Exception):
    """A slide that cannot be made from its seed (e.g. --patches finds no window on tissue): one
    line for it; with --slides / --seeds the other seeds go on."""


def generate(args, device, rank=0, world=1):
    """sample_slide made to run for a day at paper size, with the same pixels: each stage image a
    file under OUT.work/, a journal for --resume, rounds split across ranks (rank 0 alone reads
    and writes files). Returns the Journal (its state is rank 0's), or None when --resume found
    the run complete."""
    t_start = time.time()
    settings, preset = resolve(args, device, rank, world)
    if rank == 0:
        remove_own_orphans(args.out)
    work, journal = open_work(args, settings, preset, rank, world)  # replays a half-written round
    if journal is None:  # --resume of a run that is complete
        return None
    path = lambda s: os.path.join(work, f"stage{s}.npy")
    images = {}
    # Stage 1, or (--from) the real slide's stages below --start-stage in place of generated ones
    # (all of them, so the slide's stage PNGs are complete for metrics.py).
    if settings.start_stage == 1:
        images[1] = first_stage(settings, preset, journal, path(1), device, rank, world)
    elif settings.from_slide:
        for s in range(1, settings.start_stage):
            images[s] = real_lower_stage(settings, preset, journal, s, path(s), rank, world)
    # Stages 2-3: patch grids, each conditioned on the stage below; with windows, only the
    # patches they depend on (needed_cells).
    cells = lambda wins, below=1: windows.needed_cells(
        preset, settings.order, settings.sampling.edge_margin, wins, settings.stages, below,
        settings.batch)
    wins, need = settings.windows, cells(settings.windows)
    for s in need if rank == 0 else ():
        print(f"windows: stage {s}: {len(need[s])} of {cascade.stage_grid(preset, s).n ** 2} "
              "patches", file=sys.stderr)
    for s in range(max(settings.start_stage, 2), settings.stages + 1):
        if settings.patches and s == 3:  # random windows on the tissue of the finished stage 2
            wins = windows.tissue_windows(images[2], settings, preset, rank, world)
            if not wins:
                raise SlideSkipped(f"--out {args.out}: no --patches window on tissue (at least "
                                   f"--white-threshold {settings.white_threshold}) in the "
                                   "generated stage 2; a slide with almost no tissue")
            need = cells(wins, below=2)
            if rank == 0:
                print(f"--patches: {len(wins)} windows on tissue; stage 3: {len(need[3])} of "
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
            windows.write_windows(args.out, images, wins, settings, mpp, args.lower_windows,
                                  whole=[s for s in images if s not in need])
        else:
            t_write, written = write_slide(args.out, images, preset, mpp=mpp,
                                           compression=args.compression, workdir=work)
            report(args.out, images, mpp, time.time() - t_start, t_write, written,
                   stage_lines(journal))
        for img in images.values():
            img.close()
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return journal


def remove_own_orphans(out):
    """Remove the temp files that killed runs of OUT left beside it (the slide, its stage images,
    windows, manifests, the pyramid's levels; tagged with their pid): those of a process that is
    gone. They would otherwise be taken for slides or results, or fill the disk."""
    folder, name = os.path.split(os.path.abspath(out))
    root = glob.escape(os.path.splitext(name)[0])
    gone = remove_orphans(folder, (f"{root}.tmp*", f"{glob.escape(name)}.*tmp*", f"{root}_*.tmp*",
                                   f".{root}.tmp*"))
    if gone:
        print(f"removed {len(gone)} temp file(s) that an interrupted run left: {', '.join(gone)}",
              file=sys.stderr)


def first_stage(settings, preset, journal, path, device, rank, world):
    """Stage 1: one CDM sample of the whole slide zoomed out, into the file `path` (rank 0)."""
    if not journal.done(1) and rank == 0:
        t0 = time.time()
        cdm = Checked(stage_model(settings, preset, 1, device))
        x = cdm.sample([tiler.patch_generator(settings.seed, 1, 0, 0, device)],
                       sampling=settings.sampling)  # (1, 3, N1, N1)
        N1 = cascade.stage_size(preset, 1)
        img = DiskArray(path, (N1, N1, 3))
        img.write(0, 0, cascade.to_uint8(x)[0])
        img.flush()
        journal.mark(1, [((0, 0), None, False)], time.time() - t0, cdm.seconds)
    barrier(world)
    print(f"stage 1: {cascade.stage_size(preset, 1)} px done", file=sys.stderr)
    return DiskArray(path) if rank == 0 else None


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
    white = data.white_test(sp, stage, S.white_threshold) if lower else None
    model = Checked(stage_model(S, preset, stage, device))
    sample_fn = functools.partial(model.sample, sampling=sp)
    journal.share(world)
    skip = [] if cells is None else [(i, j) for i in range(grid.n) for j in range(grid.n)
                                     if (i, j) not in cells]
    todo = tiler.plan(S.order, grid.n, S.batch, journal.done(stage) + skip, world)
    left = [c for rnd in todo for b in rnd for c in b]
    n_fill = sum(white(lower, *grid.origin(*c), grid.patch) for c in left) if white else 0
    progress = Progress(stage, grid.n ** 2 - len(skip), n_fill, len(journal.done(stage)),
                        len(journal.filled(stage)))
    below = lambda rnd: [transfer.lower_inputs(grid, batch, lower, white) for batch in rnd]
    read = lambda batch, low: transfer.read_batch(grid, canvas, batch, lower=lower, below=low)

    def finish(results, seconds, model_seconds):  # in the writer: on disk, then in the journal
        canvas.flush()
        journal.mark(stage, results, seconds, model_seconds)
        progress.update(results)

    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        ahead = reader.submit(below, todo[0]) if todo and rank == 0 else None
        written = None
        for k, rnd in enumerate(todo):
            t_round, model.seconds = time.time(), 0.0
            # Read ahead: the next round's inputs from the stage below, while this one computes.
            lows = ahead.result() if rank == 0 else None
            if rank == 0 and k + 1 < len(todo):
                ahead = reader.submit(below, todo[k + 1])
            # Generate: this rank's batches of the round.
            floats = (transfer.float_inputs(grid, raw, S.order)
                      for raw in scatter_batches(rnd, lows, read, rank, world))
            results = [r for inputs in floats
                       for r in tiler.run_batch(sample_fn, inputs, stage=stage, seed=S.seed,
                                                feather=sp.feather, device=device)]
            results = gather(results, rank, world)
            # Write: rank 0 saves the round whole, writes it into the stage image (the next
            # round's known pixels), then syncs and marks it done in the background.
            if rank == 0:
                if written:
                    written.result()  # the previous round is marked done, its round file gone
                journal.stage_round(stage, results)
                write_round(canvas, grid, results)
                written = writer.submit(finish, results, time.time() - t_round, model.seconds)
        if written:
            written.result()
    barrier(world)


def write_slide(out, images, preset, *, mpp, compression, workdir=None):
    """A run's files: the lower stages as OUT.stage{s}.png (for metrics.py: magnifications 0-1), the
    previews, then the last stage as the slide OUT (temp name, then rename): OUT appears last, so
    a run stopped before it has written nothing a later step reads as finished, and one stopped
    after it lacks nothing. images: {stage: (N, N, 3) uint8 array-like}; workdir: where the
    pyramid's temporary levels go (default: beside OUT). Returns (seconds, the files written)."""
    t0, final, written = time.time(), max(images), []
    for s in sorted(images)[:-1]:
        with atomic_path(f"{out}.stage{s}.png") as tmp:
            Image.fromarray(np.asarray(images[s][:])).save(tmp, format="PNG")
        written.append(f"{out}.stage{s}.png")
    with atomic_path(out) as tmp:
        write_aperio(tmp, images[final], mpp=mpp, compression=compression, workdir=workdir,
                     synthetic=True)  # its description says sample.py made it (metrics.py)
        written += slide_previews(out, images, preset, slide=tmp)  # before the rename
    return time.time() - t0, written


def new_canvas(path, N, background, rank, fill=True):
    """The (N, N, 3) stage image file of a grid stage (rank 0; None elsewhere), created once;
    filled with the background, or (fill=False, for windows) left sparse: no bytes on disk."""
    if rank:
        return None
    if not os.path.exists(path):
        with atomic_path(path) as tmp:
            DiskArray(tmp, (N, N, 3), fill=background if fill else None).close()

    return DiskArray(path)


def real_lower_stage(settings, preset, journal, stage, path, rank, world):
    """Stage `stage` of the real slide of --from: its area resized to N_stage exactly as
    training builds it (data.slide_cache: same area choice, same resize)."""
    if not journal.done(stage) and rank == 0:
        t0, N = time.time(), cascade.stage_size(preset, stage)
        img = DiskArray(path, (N, N, 3))
        cache = data.slide_cache(settings.from_slide, preset, cascade.stage_size(preset, 3),
                                 os.path.join(journal.work, "from"),  # N3: sampling's geometry
                                 images=(f"stage{stage}",))  # the one stage image it needs
        for r0 in range(0, N, 256):
            img.write(r0, 0, np.asarray(cache[f"stage{stage}"][r0:r0 + 256]))
        img.flush()
        img.close()
        journal.mark(stage, [((0, 0), None, False)], time.time() - t0)
    barrier(world)
    print(f"stage {stage}: taken from {settings.from_slide}", file=sys.stderr)
    return DiskArray(path) if rank == 0 else None


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


def stage_model(settings, preset, stage, device):
    """The CDM of a stage that a run's settings name: the model files, or the stand-in
    (--dry-run); a one-line error for a bad file."""
    if settings.dry_run:
        return DryRunCDM(preset, stage)
    try:
        return checkpoints.load_cdm(settings.ckpt, preset, stage, device,
                                    bf16=settings.precision == "bf16")
    except (FileNotFoundError, ValueError) as e:
        fail(f"--ckpt {e}")


class Checked:
    """A stage's CDM whose sample() also adds up the seconds spent in the model and stops the run
    with one line when the model gives non-finite pixels (broken weights), instead of a slide."""

    def __init__(self, cdm):
        self.cdm, self.device, self.seconds = cdm, getattr(cdm, "device", "cpu"), 0.0

    def sample(self, generators, **inputs):
        t0 = time.time()
        x = self.cdm.sample(generators, **inputs)
        self.seconds += time.time() - t0
        if not torch.isfinite(x).all():
            raise FloatingPointError("the model produced non-finite pixels (NaN or inf): its "
                                     "weights are broken; retrain or re-export it")
        return x


def stage_lines(journal):
    """A line per stage of a run's journal: patches, seconds, generated / filled, host time."""
    return [f"  stage {s}: {n} patches in {secs:.1f} s ({n - filled} generated, {filled} filled "
            f"as glass); outside the model {(secs - (model or secs)) / max(n, 1):.3f} s/patch "
            "(rank 0)" for s, (n, filled, secs, model) in journal.stages().items()]


def report(out, images, mpp, seconds, t_write, written, lines=()):
    """A summary on stderr: the slide, its size, the time; `written`: the other files (lines:
    more lines). The seam score and the other metrics: metrics.py."""
    final = images[max(images)]
    lines = [f"wrote {out}: {final.shape[1]} x {final.shape[0]} px at {mpp:.4g} um/px, "
             f"{os.path.getsize(out) / 1e6:.1f} MB, {seconds / 60:.1f} min in this run", *lines,
             f"  written in {t_write:.1f} s with {', '.join(written)}",
             f"  evaluate it: python metrics.py --real SLIDE --fake {out} (FID, KID, precision / "
             "recall, consistency, seam score)"]
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


def one_line_errors(fn, *a):
    """Run fn; faults of the machine or of the models end with one line, not a traceback."""
    try:
        return fn(*a)
    except OSError as e:  # disk full (28), read-only file system (30), a vanished directory ...
        fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}; nothing written was "
             "lost (resume with --resume once the cause is fixed)")
    except (FloatingPointError, SlideSkipped) as e:
        fail(str(e))
    except RuntimeError as e:  # torch.distributed: the other end of a collective is gone
        if "closed by peer" not in str(e) and "Connection reset" not in str(e):
            raise
        fail("another rank stopped (its error is above); nothing written was lost")
