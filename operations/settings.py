"""Settings: what a sampling or training run will do, resolved from its flags and preset before
any work (sample.py's Settings, which the journal stores; train.py's preset and models; recipes)."""
import dataclasses
import glob
import os
import shutil

import cascade
from operations import checkpoints, flags
from operations.distributed import on_rank0, use_bf16
from operations.flags import between, check_ranges, count, fail, seed
from operations.files import remove_orphans
from operations.slides import SlideError, list_slides, open_slide, slides_mpp


# ---------------------------------------------------------------------- sample.py's settings

def get_preset(name):
    """The preset --preset names (cascade.PRESETS), or a one-line error."""
    try:
        return cascade.get_preset(name)
    except ValueError as e:
        fail(f"--preset {e}")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a sampling run's slide depends on, resolved once from the flags and the preset.
    The journal stores it; --resume requires the same."""
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


def resolve(args, device, rank=0, world=1):
    """Settings from the flags and the preset: every default and every check in one place,
    before any work. Returns (Settings, preset)."""
    preset = get_preset(args.preset)
    start = check_from(args, preset) if args.from_slide else (3 if args.outpaint else 1)
    stages = list(range(start, args.stages + 1))
    ckpt, models, distilled = ("", {}, {}) if args.dry_run else checkpoints.check_models(
        args, preset, stages)
    sampling = resolve_sampling(args, preset, distilled)
    # only rank 0 writes (other machines need no shared file system); its error ends every rank
    on_rank0(lambda: check_out(args, preset, stages), rank, world)
    windows, patch_size = check_window_flags(args, preset, max(stages))
    return Settings(preset=preset.name, seed=args.seed, stages=max(stages), order=sampling.order,
                    batch=args.batch or default_batch(preset), white_threshold=args.white_threshold,
                    outpaint=args.outpaint, dry_run=args.dry_run,
                    precision="bf16" if use_bf16(args.precision, device) else "fp32",
                    sampling=sampling, models=models, ckpt=ckpt, start_stage=start,
                    from_slide=os.path.realpath(args.from_slide) if args.from_slide else "",
                    windows=windows, patches=args.patches or 0, patch_size=patch_size), preset


def check_sample_flags(args, p):
    """Every numeric flag of sample.py within what the slide and the machine allow (counts that
    never finish or run out of memory are refused); one line for the first that is not."""
    n3, N3, half = p.n_patches[2] ** 2, cascade.stage_size(p, 3), p.patch // 16
    side = args.patch_size or p.patch
    windows = max(1, (N3 // min(max(side, 1), N3)) ** 2)
    check_ranges(args, {
        "--seed": seed(), "--steps": count(1, 10 ** 5), "--resample": count(1, 100),
        "--eta": (between(0, 1)[0], "a value in [0, 1] (DDIM: 0 deterministic, 1 ancestral)"),
        "--threshold": between(0, 1), "--aug-level": between(0, 1),
        "--white-threshold": between(0, 1), "--mpp": (between(0, 1000)[0], "a value in (0, 1000]"),
        "--batch": count(1, n3, f"the {n3} patches of preset {p.name}'s stage 3"),
        "--gpus": count(1, n3, f"the {n3} patches of preset {p.name}'s stage 3"),
        "--slides": count(1, 10 ** 6), "--patch-size": count(1, N3, "the final stage's side"),
        "--patches": count(1, windows, f"windows of {side} px the {N3} px slide holds apart"),
        "--tflops": (between(0, 10 ** 6)[0], "a value in (0, 10^6]"),
        "--mfu": (between(0, 1)[0], "a share of the peak in (0, 1]"),
        "--feather": (between(0, half)[0], f"a value in [0, {half}] px for preset {p.name} (half "
                      f"its {p.patch // 8} px overlap)")})
    for flag in ("--mpp", "--tflops", "--mfu"):  # above 0
        value = getattr(args, flag[2:], None)
        if value is not None and value <= 0:
            fail(f"{flag} {value}: use a value above 0")


def default_batch(preset):
    """Patches per U-Net batch when --batch is not given: 1 at GPU-filling sizes (1024 px), so
    that a round's patches spread over every rank (batches are cut before ranks take their
    share); 8 for small patches (the CPU demo)."""
    return 1 if preset.patch >= 1024 else 8


def check_window_flags(args, p, last):
    """--window / --patches: windows inside the final stage. Returns (windows, patch size)."""
    N, windows = cascade.stage_size(p, last), tuple(tuple(w) for w in args.window or ())
    for k, (x, y, w, h) in enumerate(windows):
        if not (w >= 1 and h >= 1 and 0 <= x and x + w <= N and 0 <= y and y + h <= N):
            fail(f"--window {x} {y} {w} {h}: must lie inside the {N} x {N} px stage {last} image")
        if (x, y, w, h) in windows[:k]:
            fail(f"--window {x} {y} {w} {h}: given twice; give each window once")
    size = args.patch_size or p.patch
    if args.patches is not None and (args.patches < 1 or windows or not 1 <= size <= N
                                     or last != 3):
        fail(f"--patches {args.patches}: use N >= 1, without --window, with --patch-size 1 to {N} "
             "and --stages 3 (leave --patches out for the whole slide)")
    if args.patch_size is not None and not args.patches:
        fail(f"--patch-size {args.patch_size} sizes the --patches windows; add --patches N")
    if getattr(args, "lower_windows", False) and not (windows or args.patches):
        fail("--lower-windows writes the windows' fields in the lower stages; add --window X Y W H "
             "or --patches N")
    return windows, size if args.patches else 0


def check_from(args, p):
    """--from SLIDE --start-stage S: a readable slide at least the area's size, S within --stages.
    Returns S."""
    start = args.start_stage or 2
    if args.outpaint:
        fail("--from and --outpaint: choose one (the outpainting baseline has no lower stage)")
    if start > args.stages:
        fail(f"--start-stage {start} with --stages {args.stages}: nothing to generate")
    try:
        W, H = open_slide(args.from_slide).dimensions
    except SlideError as e:
        fail(f"--from {e}")
    N3 = cascade.stage_size(p, 3)
    if min(W, H) < N3:
        fail(f"--from {args.from_slide}: {W} x {H} px is smaller than preset {p.name}'s {N3} px "
             "area; use a larger slide or another preset")
    return start


def resolve_sampling(args, p, distilled=None):
    """The preset's Sampling with the flags that override it, each flag checked. distilled:
    {(stage, level): record} of distilled students (checkpoints.check_models): their steps and
    sampler, unless --steps or --sampler say otherwise."""
    sp = p.sampling
    check_sample_flags(args, p)
    if args.steps is not None and len(args.steps) not in (3, 9):
        fail(f"--steps {args.steps}: use 3 values (one per level) or 9 (per stage and level)")
    margin = sp.edge_margin if args.edge_margin is None else args.edge_margin
    try:  # checked by the rule the tiler applies
        cascade.Grid(p.patch, 1, margin)
    except ValueError as e:
        fail(f"--edge-margin (preset {p.name}): {e}")
    pick = lambda flag, default: default if flag is None else flag
    if distilled and args.steps is None and args.sampler is None:
        sp = students_sampling(sp, distilled)
    return dataclasses.replace(
        sp, steps=tuple(pick(args.steps, sp.steps)), sampler=pick(args.sampler, sp.sampler),
        eta=pick(args.eta, sp.eta),
        threshold=sp.threshold if args.threshold is None else (args.threshold or None),
        resample=pick(args.resample, sp.resample), aug_level=pick(args.aug_level, sp.aug_level),
        edge_margin=margin, feather=pick(args.feather, sp.feather),
        fill_white=tuple(pick(args.fill_white, sp.fill_white)), order=pick(args.order, sp.order))


def students_sampling(sp, distilled):
    """Sampling `sp` with, for each distilled (stage, level), the steps and sampler its model file
    records (nine values each)."""
    cells = [(s, lvl) for s in (1, 2, 3) for lvl in range(3)]
    pick = lambda key, own: tuple(distilled[c][key] if c in distilled else own(*c) for c in cells)
    return dataclasses.replace(sp, steps=pick("steps", sp.level_steps),
                               sampler=pick("sampler", sp.level_sampler))


def check_out(args, p, stages):
    """--out names a file in a writable directory with room for the run."""
    out = os.path.abspath(args.out)
    if os.path.isdir(out):
        fail(f"--out {args.out} is a directory; give a file name such as "
             f"{os.path.join(args.out, 'slide.tif')}")
    folder = os.path.dirname(out)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        fail(f"--out {args.out}: cannot write into {folder} (missing or read-only)")
    # the stage images, the pyramid's temporary levels and the slide; windows: their closure
    sizes = [3 * cascade.stage_size(p, s) ** 2 for s in stages]
    if args.window or args.patches:
        windows = max(len(args.window or ()), args.patches or 0)
        sizes[-1] = min(sizes[-1], 3 * p.patch ** 2 * 50 * windows)
    need = sum(sizes) * 1.4
    free = shutil.disk_usage(folder).free
    if free < need and not args.resume:
        fail(f"--out {args.out}: this run needs about {need / 1e9:.1f} GB in {folder}, "
             f"{free / 1e9:.1f} GB are free")


# ---------------------------------------------------------------------- train.py's settings

@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """Everything a train.py run will do, resolved once from its flags before any work: the preset
    (its recipe with the flags that override it), the (stage, level) models, train.Config's
    fields, the slides of --data and their um/px."""
    preset: cascade.Preset
    models: list
    config: dict
    slides: list
    mpp: object


def training(args, rank, device):
    """train.py's flags -> its TrainingRun, every check made (one line for the first that fails)."""
    preset, models = train_preset(args), models_to_train(args)
    config = train_fields(args, device)
    check_batch_memory(args, preset, models, device)
    slides, mpp = training_slides(args, preset, rank, device)
    return TrainingRun(preset, models, config, slides, mpp)


def train_preset(args):
    """The preset with the training flags that override its recipe (--crop, --min-snr-gamma,
    --positions, --crop-context)."""
    preset = get_preset(args.preset)
    tr = preset.training
    if args.crop is not None:
        top = preset.level_sizes[-1]
        if not (8 <= args.crop <= top and args.crop % 8 == 0):
            fail(f"--crop {args.crop}: use a multiple of 8 from 8 to {top} (the top level's size) "
                 f"for preset {preset.name}")
        tr = dataclasses.replace(tr, crop=args.crop)
    if args.min_snr_gamma is not None:
        tr = dataclasses.replace(tr, min_snr_gamma=args.min_snr_gamma or None)
    if args.positions is not None:
        tr = dataclasses.replace(tr, positions=args.positions)
    if args.crop_context is not None:
        tr = dataclasses.replace(tr, crop_context=args.crop_context)
    if args.holdout is not None:
        tr = dataclasses.replace(tr, holdout=args.holdout)
    return dataclasses.replace(preset, training=tr)


def train_fields(args, device):
    """train.Config's fields from train.py's flags on `device`."""
    steps = args.max_steps * 3 if len(args.max_steps) == 1 else args.max_steps
    workers = auto_workers(device) if args.workers == "auto" else int(args.workers)
    # deviation: the authors trained in fp32; auto = bf16 autocast where native (README)
    return dict(out=args.out, batch=args.batch, lr=args.lr, max_steps=tuple(steps),
                ema=args.ema, bf16=use_bf16(args.precision, device), seed=args.seed,
                conditioned=not args.outpaint, init=args.init, compile=args.compile,
                workers=workers, log_every=args.log_every, save_every=args.save_every,
                keep=args.keep, sample_every=args.sample_every, sample_steps=args.sample_steps,
                max_nonfinite=args.max_nonfinite, max_unreadable=args.max_unreadable,
                check_replicas=args.check_replicas, distill=args.distill,
                distill_steps=args.distill_steps, rounds=args.rounds)


def round_path(cfg, distill, stage, level):
    """Where a model's checkpoint is: OUT/stage{s}_level{l}.pt, or for a distillation round's
    student OUT/steps{K}/stage{s}_level{l}.pt (K: its steps; the next round's teacher)."""
    name = checkpoints.model_filename(stage, level)
    return os.path.join(cfg.out, f"steps{distill.steps}", name) if distill else \
        os.path.join(cfg.out, name)


def training_slides(args, preset, rank, device):
    """The slides of --data and their um/px (slides_mpp), with the start's notices (defaults
    taken, the paper's 200k steps on a CPU) and the temp files of killed saves removed from
    --out. A one-line error when --data holds no usable slide. Returns (paths, mpp or None)."""
    os.makedirs(args.out, exist_ok=True)
    if rank == 0:
        remove_orphans(args.out, ("*.tmp*.pt", "*.tmp*.jsonl"))
        if args.defaulted:
            print("defaults: " + ", ".join(args.defaulted) + " (pass the flags to change them)",
                  flush=True)
        if args.max_steps == [200_000] and device.type == "cpu" and not args.memory:
            print("note: --max-steps is left at the paper's 200000 and this runs on a CPU: the "
                  "ETA after step 1 says how long that takes; pass --max-steps for a shorter run",
                  flush=True)
    try:
        slides = list_slides(args.data)
        return slides, slides_mpp(slides, args.area_size, cascade.stage_size(preset, 3))
    except SlideError as e:
        fail(f"--data {e}")


def check_distill_flags(args):
    """--distill-steps K and --rounds R: K / 2^(R-1) whole and >= 1; both only with --distill."""
    if not args.distill:
        if args.distill_steps is not None or args.rounds != 1:
            fail("--distill-steps and --rounds set a distillation; add --distill TEACHER_DIR")
        return
    if not os.path.isdir(args.distill):
        fail(f"--distill {args.distill}: no such directory of teacher model files")
    k, r = args.distill_steps, args.rounds
    if k is not None and (k % 2 ** (r - 1) or k < 2 ** (r - 1)):
        fail(f"--rounds {r} halves --distill-steps {k} {r - 1} time(s): give steps divisible by "
             f"{2 ** (r - 1)}")


def half_the_teachers_steps(teacher):
    """The default student steps: half those a distilled teacher model file records."""
    try:
        had = checkpoints.distilled(teacher)
    except (OSError, RuntimeError):
        had = None
    if not had:
        fail(f"--distill {teacher}: not a distilled model; give --distill-steps K (its student's "
             "steps; the teacher takes 2K)")
    return had["steps"] // 2


def export_sources(args):
    """{(stage, level): the checkpoint directory --export writes it from}: --out; with --distill
    the model's last round (OUT/steps{K}/ of the smallest K holding it) or, for a model not
    distilled, its teacher's directory (a complete set of model files either way)."""
    sources = {}
    for s, lvl in models_to_train(args):
        name, src = checkpoints.model_filename(s, lvl), args.out
        if args.distill:
            rounds = sorted(glob.glob(os.path.join(glob.escape(args.out), "steps*", name)),
                            key=lambda p: int(os.path.basename(os.path.dirname(p))[5:]))
            src = os.path.dirname(rounds[0]) if rounds else args.distill
        sources[(s, lvl)] = src
    return sources


def check_batch_memory(args, preset, models, device):
    """--batch against this machine's memory (the GPU's, or the RAM on a CPU): a training step
    holds at least its U-Net's first layer output, batch x width x side^2 floats; a batch whose
    first layer alone does not fit is refused before any work (train.py --memory: the whole
    plan)."""
    memory = flags.memory_bytes(device)
    for s, lvl in models:
        cfg, L = cascade.unet_config(preset, s, lvl), preset.level_sizes[lvl]
        side = min(L, preset.training.crop) if lvl == len(preset.level_sizes) - 1 else L
        first = 4 * args.batch * cfg.width * side ** 2
        if first > memory:
            most = max(1, memory // (first // args.batch))
            fail(f"--batch {args.batch}: a step of stage {s} level {lvl} holds at least "
                 f"{first / 2 ** 30:.3g} GiB (its first layer alone), this {device.type} has "
                 f"{memory / 2 ** 30:.3g} GiB; use --batch {most} or less (train.py --memory "
                 "gives the whole plan)")


def models_to_train(args):
    """[(stage, level), ...] from --stage / --level."""
    stages = [1, 2, 3] if args.stage == "all" else [int(args.stage)]
    levels = [0, 1, 2] if args.level == "all" else [int(args.level)]
    return [(s, lvl) for s in stages for lvl in levels]


def auto_workers(device):
    """Loader workers of one rank: on CUDA its share of this machine's cores less one (the rank's
    own process); on CPU none (the step itself uses the cores)."""
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)


def shown(path):
    """A path as a user would type it here: relative below the working directory, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def train_defaults(args, slide):
    """The defaults that serve the bare `train.py --stage 3 --level 0` (--data: the bundled
    `slide`, --out ckpt, --cache OUT/cache) filled in, and listed in args.defaulted (said at the
    start)."""
    args.defaulted = [f"--{k} {v}" for k, v in (
        ("data", shown(slide) if args.data is None else None),
        ("out", "ckpt" if args.out is None else None),
        ("cache", os.path.join(args.out or "ckpt", "cache") if args.cache is None else None)) if v]
    args.data = args.data or slide
    args.out = args.out or "ckpt"
    args.cache = args.cache or os.path.join(args.out, "cache")
    return args
