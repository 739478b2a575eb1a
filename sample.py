"""Generate a whole synthetic slide with URCDM and write it as a pyramidal BigTIFF.

    python sample.py --out slide.tif                  # the demo preset with the shipped models
    python sample.py --preset paper --ckpt CKPT_DIR --out slide.svs
    torchrun --nproc_per_node=8 sample.py ...          # each round's patches split across ranks
    python sample.py --preset paper --dry-run --out x.tif   # full geometry, cheap stand-in models
    python sample.py --from REAL.svs --start-stage 3 --out twin.tif   # zoom into a real slide
    python sample.py --slides 100 --out synth/slide.tif   # 100 slides (seeds 0-99), a manifest

Read `sample_slide`: the whole algorithm [PAPER Fig. 1] in one process and in memory. Stage 1
generates the whole slide at N1 px; stages 2 and 3 each generate an overlapping grid of patches,
every patch conditioned on the stage below and holding the pixels its finished neighbours fixed
(tiler.py). `main` runs it and writes the slide, as the demo command does. A run that needs more
(a paper-size slide, ranks, --resume, windows, many slides, --from, stand-in models) goes to
operations/runs.py's `generate`: the same algorithm with the same pixels, streamed to disk.

References
  [PAPER]     Cechnicka et al., URCDM, MICCAI 2024 (Sec. 2, Fig. 1).
"""
import functools
import os
import time

import torch.distributed as dist

import cascade
import data
import sde
import tiler
from operations import costs, flags, many, runs, settings
from operations.distributed import PRECISION_HELP, init_distributed
from operations.logs import Progress


def sample_slide(cdms, preset, sampling, *, seed=0, order="packed", batch=8,
                 white_threshold=data.MIN_TISSUE, progress=None):
    """A whole slide [PAPER Fig. 1], in one process and in memory (the demo's 2048 px; not paper
    size, which operations/runs.py streams to disk). cdms: {stage: cascade.CDM}; sampling: a
    cascade.Sampling; progress: None, or progress(stage, grid, lower, white) -> an object whose
    update(results) runs after each round (operations.logs.Progress.counting).
    Returns {stage: (N_s, N_s, 3) uint8}: the pixels `generate` writes with the same settings."""
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
        white = data.white_test(sampling, s, white_threshold)  # mostly glass: filled, not generated
        canvas = tiler.MemoryCanvas(grid.size, preset.background)
        tiler.generate_stage(functools.partial(cdms[s].sample, sampling=sampling), grid, canvas,
                             stage=s, seed=seed, order=order, batch=batch, lower=lower,
                             white=white, feather=sampling.feather, device=cdms[s].device,
                             on_round=progress and progress(s, grid, lower, white).update)
        images[s] = canvas.array
    return images


# The largest final stage made in memory (8192 px: 200 MB of stage images). Larger slides, and runs
# with any of these flags, take the streamed path (operations/runs.py).
IN_MEMORY_SIDE = 8192
STREAMED_FLAGS = ("stream", "resume", "keep_work", "window", "patches", "slides", "seeds",
                  "from_slide", "dry_run", "outpaint")


def in_memory(args, preset, world):
    """Whether sample_slide makes this run's slide: one process, all three stages, a final stage
    of at most IN_MEMORY_SIDE px, none of STREAMED_FLAGS, and no streamed run of this OUT begun
    (OUT.work/: the streamed path resumes, overwrites or refuses it)."""
    return (world == 1 and args.stages == 3 and cascade.stage_size(preset, 3) <= IN_MEMORY_SIDE
            and not any(getattr(args, f) for f in STREAMED_FLAGS)
            and not os.path.exists(args.out + ".work"))


def make_slide(args, device):
    """sample_slide with the models of --ckpt, then the slide file OUT, its lower stages and
    previews, and a summary on stderr."""
    t0 = time.time()
    run, preset = settings.resolve(args, device)  # every flag checked before any work
    runs.remove_own_orphans(args.out)
    if os.path.exists(args.out) and not args.overwrite:
        flags.fail(f"--out {args.out} exists; pass --overwrite to replace it")
    cdms = {s: runs.Checked(runs.stage_model(run, preset, s, device)) for s in (1, 2, 3)}
    images = sample_slide(cdms, preset, run.sampling, seed=run.seed, order=run.order,
                          batch=run.batch, white_threshold=run.white_threshold,
                          progress=Progress.counting)
    mpp = args.mpp or runs.model_mpp(run, preset, 3)
    try:
        t_write, written = runs.write_slide(args.out, images, preset, mpp=mpp,
                                            compression=args.compression)
    except OSError as e:  # the in-memory run keeps no OUT.work/: say what is lost
        flags.fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}; the slide was "
                   "made in memory and is lost (no OUT.work/ to resume from); free the space and "
                   "run again, with --stream to keep OUT.work/ for --resume")
    runs.report(args.out, images, mpp, time.time() - t0, t_write, written)


def main(argv=None):
    args = parse_args(argv)
    settings.check_sample_flags(args, settings.get_preset(args.preset))  # before any work
    if args.estimate:  # the cost of a slide, arithmetic: no models needed
        return costs.estimate(args)
    ddp, rank, world, device = init_distributed(args.device)
    if in_memory(args, settings.get_preset(args.preset), world):
        make_slide(args, device)
    elif args.seeds or args.slides:
        many.many_slides(args, device, rank, world)
    else:
        runs.generate(args, device, rank, world)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def parse_args(argv=None):
    ap = flags.Parser(__doc__)
    ap.add_argument("--out", default=None,
                    help="output slide (.tif or .svs): Aperio-style pyramidal BigTIFF (required "
                         "except with --estimate)")
    ap.add_argument("--ckpt", default=None,
                    help=f"directory with stage{{s}}_level{{l}}.pt (default: {flags.DEMO_CKPT})")
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
                    help="'mostly white': less tissue than this in the field below (default "
                         "data.MIN_TISSUE, training's rule)")
    ap.add_argument("--order", default=None, choices=tiler.ORDERS,
                    help="raster (the paper, one patch a round); wavefront (raster's slide in "
                         "136 rounds at paper size: exactly at --batch 1, up to float rounding at "
                         "any batch); packed (wavefront's batches in rounds as full as the ranks "
                         "allow: its slide in 279 rounds on 8 ranks); checkerboard (4 rounds, "
                         "another slide; cheap windows). Default: the preset's (paper_plus: "
                         "checkerboard; others: packed)")
    ap.add_argument("--batch", type=int, default=None,
                    help="patches per U-Net batch (default: 1 at 1024 px patches, where one patch "
                         "fills a GPU and every rank of a round gets work; 8 below); a run's slide "
                         "depends on it up to float rounding, never on the number of ranks")
    ap.add_argument("--stages", type=int, default=3, choices=[1, 2, 3],
                    help="stop after this stage")
    ap.add_argument("--stream", action="store_true",
                    help=f"stage images on disk under OUT.work/ with a journal, so that --resume "
                         f"can continue a stopped run (the default above {IN_MEMORY_SIDE} px, and "
                         "with ranks or the flags that need it)")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run (OUT.work/)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing --out and discard OUT.work/")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help=PRECISION_HELP)
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
    ap.add_argument("--slides", type=int, default=None,
                    help="many slides: N, one a seed from --seed on")
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
    g.add_argument("--patches", type=int, default=None,
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


if __name__ == "__main__":
    flags.one_line(runs.one_line_errors, "nothing written was lost: a streamed run (OUT.work/) "
                   "continues with --resume; the in-memory demo starts again", main)
