"""Model files: their format, the check that a file is the model asked for, loading a U-Net or a
stage's CDM from files alone, and training checkpoints (save, resume, start from, export)."""
import dataclasses
import glob
import os

import torch

import cascade
import unet as unet_mod
from operations.files import atomic_path, file_digest
from operations.flags import DEMO_CKPT, fail

MODEL_FORMAT = "urcdm-model-v2"  # v2: UNet by levels (encoder / decoder), the whole preset
FP16_MAX = 65504.0


def model_filename(stage, level):
    return f"stage{stage}_level{level}.pt"


def model_payload(preset, stage, level, cfg, state_dict, conditioned=True, **extra):
    """The dictionary saved as stage{s}_level{l}.pt (plain types only: weights_only=True loads it).
    It records the whole preset, training and sampling defaults included."""
    return {"format": MODEL_FORMAT, "preset": dataclasses.asdict(preset), "stage": stage,
            "level": level,
            "conditioned": conditioned, "unet_config": cfg.to_dict(), "ema": state_dict, **extra}


def _as_lists(v):
    """Tuples and lists compare alike (checkpoints may hold either)."""
    return [_as_lists(x) for x in v] if isinstance(v, (list, tuple)) else v


def checkpoint_mismatch(ck, preset, stage, level, conditioned=None):
    """Why a loaded model file is not (preset, stage, level)'s, or None if it is: the one check
    for sampling (load_unet) and resuming (train.py). conditioned: None = either kind."""
    if not isinstance(ck, dict) or not str(ck.get("format", "")).startswith("urcdm-model-"):
        return f"not a URCDM model file (format {MODEL_FORMAT} expected)"
    if ck["format"] != MODEL_FORMAT:
        return (f"format {ck['format']}, written by an earlier version of this code (this one "
                f"reads {MODEL_FORMAT}); retrain it, or sample it with the version that wrote it")
    if (ck["stage"], ck["level"]) != (stage, level):
        return (f"holds stage {ck['stage']} level {ck['level']}, "
                f"expected stage {stage} level {level}")
    mine = preset.model_dict()
    saved = {k: ck["preset"].get(k) for k in mine}
    diff = [k for k in mine if _as_lists(saved[k]) != _as_lists(mine[k])]
    if diff:
        return (f"trained for preset {ck['preset'].get('name')!r} with other settings than preset "
                f"{preset.name!r} ({', '.join(f'{k}: {saved[k]!r} vs {mine[k]!r}' for k in diff)})")
    if conditioned is not None and ck.get("conditioned", True) != conditioned:
        return ("an outpainting model" if conditioned
                else "a conditioned model, not an outpainting one")
    return None


def weights_problem(state_dict):
    """Why a model's weights are unusable, or None: a non-finite value, or one beyond fp16's
    range (a run that exploded: its exported fp16 model would hold inf)."""
    for k, v in state_dict.items():
        if v.is_floating_point() and v.numel():
            if not torch.isfinite(v).all():
                return f"{k} is not finite"
            if float(v.abs().max()) > FP16_MAX:
                return f"{k} reaches {float(v.abs().max()):.3g}, beyond fp16's range"
    return None


def load_unet(path, preset, stage, level, device="cpu"):
    """Build the U-Net of (stage, level) from its file alone; a clear error if the file is
    missing, unreadable, or belongs to another stage, level or preset.
    Returns (the network in eval mode, whether it is conditioned on the stage below)."""
    fix = (f"train it with `python train.py --preset {preset.name} --stage {stage} "
           f"--level {level}` or point --ckpt elsewhere")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing model file; {fix}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise ValueError(f"{path}: not a readable URCDM model file ({type(e).__name__}); "
                         f"{fix}") from None
    why = checkpoint_mismatch(ck, preset, stage, level) or weights_problem(ck["ema"])
    if why:
        raise ValueError(f"{path}: {why}; pass the matching --preset or retrain")
    net = unet_mod.build(unet_mod.UNetConfig(**ck["unet_config"]))
    net.load_state_dict(ck["ema"])
    # channels_last: about 4x faster convolutions on CPU (tests/bench_unet.py), same on GPU
    return net.to(device, memory_format=torch.channels_last).eval(), ck.get("conditioned", True)


def load_cdm(ckpt_dir, preset, stage, device="cpu", bf16=False):
    """The CDM of one stage from CKPT_DIR/stage{s}_level{0,1,2}.pt."""
    loaded = [load_unet(os.path.join(ckpt_dir, model_filename(stage, lvl)),
                        preset, stage, lvl, device)
              for lvl in range(3)]
    flags = {c for _, c in loaded}
    if len(flags) != 1:
        raise ValueError(f"{ckpt_dir}: stage {stage} mixes conditioned and outpainting models")
    return cascade.CDM(preset, stage, [n for n, _ in loaded], conditioned=flags.pop(),
                       device=device, bf16=bf16)


def check_models(args, p, stages):
    """The model directory (resolved), {file: sha256} of the files the stages need and
    {(stage, level): distillation record} of those that are distilled students; each file's
    identity is checked now, cheaply (mmap: no weights read), not after hours of work."""
    ckpt = os.path.realpath(args.ckpt or DEMO_CKPT)
    if not os.path.isdir(ckpt):
        fail(f"--ckpt {ckpt}: no such directory. Train the nine models with train.py (README, "
             "'Training') or pass --dry-run to try the pipeline without models")
    records = {}
    for s in stages:
        for lvl in range(3):
            n = model_filename(s, lvl)
            path = os.path.join(ckpt, n)
            if not os.path.isfile(path):
                fail(f"--ckpt {ckpt}: missing model file {n}; train it with `python train.py "
                     f"--preset {p.name} --stage {s} --level {lvl}` or point --ckpt elsewhere")
            try:
                ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001
                fail(f"--ckpt {path}: not a readable URCDM model file ({type(e).__name__})")
            why = checkpoint_mismatch(ck, p, s, lvl, None if args.outpaint else True)
            if why:
                fail(f"--ckpt {path}: {why}")
            if ck.get("distilled"):
                records[(s, lvl)] = ck["distilled"]
    names = [model_filename(s, lvl) for s in stages for lvl in range(3)]
    return ckpt, {n: file_digest(os.path.join(ckpt, n)) for n in names}, records


# ---------------------------------------------------------------------- training checkpoints

def save(trainer):
    """The trainer's checkpoint (temp name, then rename) and a numbered snapshot (the last
    --keep kept), on rank 0; broken weights are never saved."""
    T = trainer
    if T.rank != 0:
        return
    for name, sd in (("weights", T.model.state_dict()), ("EMA weights", T.ema.state_dict())):
        why = weights_problem(sd)
        if why:
            raise FloatingPointError(f"{name} at step {T.step} are broken ({why}); not saved, "
                                     f"{T.path} keeps the last good state; lower --lr or check "
                                     "the data")
    st = model_payload(
        T.preset, T.stage, T.level, T.unet_cfg, T.ema.state_dict(),
        conditioned=T.cfg.conditioned, model=T.model.state_dict(),
        optimizer=T.opt.state_dict(), step=T.step, mpp=T.mpp,
        data_position=T.position, nonfinite_total=T.nonfinite_total, seed=T.cfg.seed,
        distilled=T.distill.record(file_digest(T.distill.teacher)) if T.distill else None,
        args={k: list(v) if isinstance(v, tuple) else v
              for k, v in dataclasses.asdict(T.cfg).items()})
    with atomic_path(T.path) as tmp:
        torch.save(st, tmp)
    if T.cfg.keep > 0:
        base = T.path[:-3]
        with atomic_path(f"{base}.step{T.step:08d}.pt") as tmp:
            torch.save(st, tmp)
        for old in sorted(glob.glob(glob.escape(base) + ".step*.pt"))[:-T.cfg.keep]:
            os.remove(old)


def resume(trainer):
    """The trainer's weights, EMA, optimiser, step and data position from its checkpoint; a
    one-line error when the file is not this run's model (another preset, U-Net or seed)."""
    T = trainer
    try:
        ck = torch.load(T.path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        fail(f"{T.path}: not a readable checkpoint ({type(e).__name__}); move it "
                 "away to start afresh")
    why = checkpoint_mismatch(ck, T.preset, T.stage, T.level, T.cfg.conditioned)
    if why is None and "model" not in ck:
        why = "EMA weights only (an exported model)"
    if why is None and unet_mod.UNetConfig(**ck["unet_config"]) != T.unet_cfg:
        why = f"another U-Net ({ck['unet_config']}, now {T.unet_cfg.to_dict()})"
    if why is None and ck.get("seed") != T.cfg.seed:
        why = f"seed {ck.get('seed')}, now {T.cfg.seed}"
    was = (ck.get("distilled") or {}).get("steps")
    if why is None and was != (T.distill.steps if T.distill else None):
        why = (f"a student of {was} steps" if was else "not a distillation student") + \
            (f", now {T.distill.steps}" if T.distill else "")
    if why is None and T.distill and ck["distilled"].get("teacher_sha256") != file_digest(
            T.distill.teacher):
        why = (f"its teacher {T.distill.teacher} changed since this round began (e.g. the round "
               f"before was trained on); remove {os.path.dirname(T.path)}/ to distil it again")
    if why:
        fail(f"{T.path} cannot be resumed: {why}; use another --out or the "
                 "original settings")
    T.model.load_state_dict(ck["model"])
    T.ema.load_state_dict(ck["ema"])
    T.opt.load_state_dict(ck["optimizer"])
    for group in T.opt.param_groups:  # --lr wins over the saved one (a lower-lr phase)
        group["lr"] = T.cfg.lr
    T.step, T.position = ck["step"], ck["data_position"]
    T.nonfinite_total = ck["nonfinite_total"]
    if T.rank == 0:
        print(f"resuming {T.path} at step {T.step}", flush=True)


def start_from(trainer, path, fresh=False):
    """Model and EMA from another run's model file (exported or not) and its step (fresh: step 0,
    a distillation student's start); the optimiser and the data position start afresh."""
    T = trainer
    flag = "--distill" if fresh else "--init"
    try:
        net, conditioned = load_unet(path, T.preset, T.stage, T.level)
    except (FileNotFoundError, ValueError) as e:
        fail(f"{flag} {e}")
    if conditioned != T.cfg.conditioned or net.cfg != T.unet_cfg:
        fail(f"{flag} {path}: another U-Net or conditioning than --preset "
             f"{T.preset.name} trains; pass the preset it was trained with")
    T.model.load_state_dict(net.state_dict())
    T.ema.load_state_dict(net.state_dict())
    T.step = 0 if fresh else int(torch.load(path, map_location="cpu", weights_only=True,
                                            mmap=True)["step"])
    if T.rank == 0:
        print(f"starting from {path} (step {T.step}, its EMA weights; a fresh optimiser)",
              flush=True)


def distilled(path):
    """The distillation record of a model file ({'steps', 'sampler', ...}), or None."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("distilled")


def distilled_in(ckpt, preset):
    """{(stage, level): distillation record} of the distilled students among CKPT's model files
    of `preset` (no weights read; missing or other files are passed over: --estimate needs no
    models, it uses their step counts where it has them)."""
    records = {}
    for s in (1, 2, 3):
        for lvl in range(3):
            path = os.path.join(ckpt, model_filename(s, lvl))
            try:
                ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # noqa: BLE001 - no file, or not a model: no record
                continue
            if not checkpoint_mismatch(ck, preset, s, lvl) and ck.get("distilled"):
                records[(s, lvl)] = ck["distilled"]
    return records


def load_teacher(trainer, distill):
    """The frozen teacher of a distillation round (its EMA weights, eval mode, no gradients): the
    model file distill.teacher, checked to be (preset, stage, level)'s and, when it is itself a
    student, distilled for the 2K steps it now takes (K = distill.steps)."""
    T = trainer
    try:
        net, conditioned = load_unet(distill.teacher, T.preset, T.stage, T.level, T.device)
    except (FileNotFoundError, ValueError) as e:
        fail(f"--distill {e}")
    if conditioned != T.cfg.conditioned:
        fail(f"--distill {distill.teacher}: a teacher with other conditioning than this run's")
    had = distilled(distill.teacher)
    if had and had["steps"] != 2 * distill.steps:
        fail(f"--distill-steps {distill.steps}: the teacher {distill.teacher} was distilled for "
             f"{had['steps']} steps, so its student takes {had['steps'] // 2}")
    return net.requires_grad_(False)


def export(sources, dest):
    """Write EMA-only model files (what sample.py loads) into `dest`, each from the checkpoint in
    its directory: sources {(stage, level): directory} (settings.export_sources)."""
    os.makedirs(dest, exist_ok=True)
    for (s, lvl), out in sources.items():
        src = os.path.join(out, model_filename(s, lvl))
        try:
            ck = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            fail(f"{src}: not a readable checkpoint ({type(e).__name__})")
        if not isinstance(ck, dict) or ck.get("format") != MODEL_FORMAT or \
                (ck.get("stage"), ck.get("level")) != (s, lvl):
            fail(f"{src}: not a URCDM model file of stage {s} level {lvl}")
        keep = {k: ck[k] for k in ("format", "preset", "stage", "level", "unet_config")}
        keep.update(conditioned=ck.get("conditioned", True), step=ck.get("step", 0),
                    mpp=ck.get("mpp"), args=ck.get("args"), distilled=ck.get("distilled"))
        why = weights_problem(ck["ema"])  # non-finite, or beyond fp16's range
        if why:
            fail(f"{src}: its EMA weights are broken ({why}); not exported")
        # fp16 halves the files (the demo's models ship in the repository); loading casts to fp32
        keep["ema"] = {k: v.half() if v.is_floating_point() else v for k, v in ck["ema"].items()}
        with atomic_path(os.path.join(dest, model_filename(s, lvl))) as tmp:
            torch.save(keep, tmp)
        print(f"exported {src} (step {keep['step']}) -> {dest}")
