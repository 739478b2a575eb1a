"""Pictures for people: the one preview writer (grid_image: rows of labelled images), the slide's
Fig. 1 and thumbnail, a training model's samples beside its targets, and the loss curves."""
import dataclasses
import glob
import os

import numpy as np
import tifffile
import torch
from PIL import Image, ImageDraw, ImageFont

import cascade
import data
from operations.flags import Parser, at_least, check_ranges, fail
from operations.files import atomic_path
from operations.logs import read_log
from operations.slides import SlideError, open_slide


def _label(draw, xy, text, fill=(0, 0, 0)):
    draw.text(xy, text, fill=fill, font=ImageFont.load_default())


def fit(im, side, resample=Image.BOX):
    """A PIL image (or uint8 (h, w, 3) array) resized to fit side x side, as a PIL RGB image."""
    im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
    f = side / max(im.size)
    size = (max(1, round(im.size[0] * f)), max(1, round(im.size[1] * f)))
    return im.resize(size, resample).convert("RGB")


def grid_image(rows, side, *, title=None, names=(), gap=0, resample=Image.NEAREST):
    """The one preview layout: rows of images (PIL images or uint8 (h, w, 3) arrays), each fitted
    into a side x side cell with `gap` px of white between cells, under an optional header: a
    title line and a name above each column."""
    head = 28 if title or names else 0
    cols = max(len(r) for r in rows)
    img = Image.new("RGB", (cols * (side + gap) - gap, head + len(rows) * (side + gap) - gap),
                    "white")
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            img.paste(fit(cell, side, resample), (c * (side + gap), head + r * (side + gap)))
    draw = ImageDraw.Draw(img)
    if title:
        _label(draw, (4, 2), title)
    for c, name in enumerate(names):
        _label(draw, (c * (side + gap) + 4, 15), name)
    return img


def save_png(path, img):
    """A PIL image as a PNG at `path`, atomically."""
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def slide_previews(out, images, preset, side=512, slide=None):
    """OUT.preview.png: the paper's Fig. 1 from our own output - stage 1 (whole slide), the
    stage-2 patch at its centre, the stage-3 patch at the centre of that, each with a box
    where the next one sits. OUT.thumbnail.png: the final slide (the file `slide`, default OUT),
    zoomed out."""
    P, panels = preset.patch, []
    centre = {s: (img.shape[0] - P) // 2 for s, img in images.items()}
    for s in sorted(images):
        img = images[s]
        crop = img[:] if s == 1 else img[centre[s]:centre[s] + P, centre[s]:centre[s] + P]
        im = fit(crop, side)
        if s + 1 in images:  # where the next stage's patch lies, in this panel's pixels
            r = cascade.zoom(preset, s + 1)
            y0 = centre[s + 1] / r - (0 if s == 1 else centre[s])
            f = side / crop.shape[0]
            box = [y0 * f, (y0 + P / r) * f]
            ImageDraw.Draw(im).rectangle([box[0], box[0], box[1], box[1]],
                                         outline=(0, 90, 255), width=3)
        panels.append(im)
    with tifffile.TiffFile(slide or out) as tif:  # its smallest level: never the whole canvas
        smallest = tif.series[0].levels[-1].asarray()
    return [save_png(out + ".preview.png", grid_image([panels], side, gap=8)),
            save_png(out + ".thumbnail.png", fit(smallest.reshape(smallest.shape[-3:]), 1024))]


def dataset_row(item):
    """One training example as a row of uint8 images: the target, then each 3-channel
    conditioning input (lowres, context, region)."""
    tiles = [item["x0"]] + (list(item["cond"].split(3)) if item["cond"].shape[0] else [])
    return [cascade.to_uint8(t[None])[0] for t in tiles]


@torch.no_grad()
def training_preview(trainer, ds, n=4):
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
    fn = cascade.denoiser(T.ema, T.schedule, cond, aug_lam, T.cfg.bf16, p.sampling.ends)
    # the paper's loop at --sample-steps; a student as it will be used: DDIM at its steps
    steps, sampler = (T.distill.steps, "ddim") if T.distill else (T.cfg.sample_steps, "ancestral")
    sp = dataclasses.replace(p.sampling, steps=(steps,) * 3, sampler=sampler, resample=1)
    x = cascade.sample_level(fn, tuple(x0.shape), sp, T.stage, T.level, p, generator=g,
                             device=T.device).clamp(-1, 1).cpu()
    n_lower = 0 if cond_in is None else cond_in.shape[1] // 3 - (T.level > 0)
    names = (["lowres"] if T.level > 0 else []) + ["context", "region"][:n_lower]
    cols = (list(cond_in.split(3, dim=1)) if cond_in is not None else []) + [x, x0]
    rows = [[cascade.to_uint8(c[k:k + 1])[0] for c in cols] for k in range(n)]
    img = grid_image(rows, max(128, x0.shape[-1]), names=names + ["EMA sample", "target"],
                     title=f"stage {T.stage} level {T.level}, step {T.step}, "
                           f"{steps} sampling steps")
    os.makedirs(os.path.join(T.cfg.out, "samples"), exist_ok=True)
    return save_png(os.path.join(T.cfg.out, "samples",
                                 f"stage{T.stage}_level{T.level}_step{T.step:08d}.png"), img)


def plot_curves(ckpt_dir, out=None, panel=(360, 240)):
    """CKPT_DIR/loss_curves.png: each model's loss against its step, raw (light) and smoothed
    (EMA over log records, dark), and the validation loss (orange) where examples were held out;
    one panel per model, drawn with Pillow (no plotting library needed for a few lines).
    Returns the path, or None when CKPT_DIR holds no log."""
    logs = sorted(glob.glob(os.path.join(glob.escape(ckpt_dir), "stage*_level*.log.jsonl")))
    if not logs:
        return None
    W, H = panel
    cols = min(3, len(logs))
    img = Image.new("RGB", (cols * W, ((len(logs) + cols - 1) // cols) * H), "white")
    draw = ImageDraw.Draw(img)
    for k, path in enumerate(logs):
        recs = [r for r in read_log(path) if np.isfinite(r.get("loss", float("nan")))]
        val = [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
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
        if len(val) > 1:  # the held-out examples' loss (logs.validation_loss)
            draw.line([px(s, v) for s, v in val], fill=(220, 110, 20), width=2)
            _label(draw, (box[2] - 110, box[1] + 2), "validation", fill=(220, 110, 20))
        _label(draw, (ox + 2, box[1]), f"{hi:.3g}")
        _label(draw, (ox + 2, box[3] - 10), f"{lo:.3g}")
        _label(draw, (box[0], box[3] + 4), f"step {int(steps[0])}")
        _label(draw, (box[2] - 70, box[3] + 4), f"step {int(steps[-1])}")
    return save_png(out or os.path.join(ckpt_dir, "loss_curves.png"), img)


def inspect_slide(argv=None):
    """python -m operations.previews SLIDE: a slide's levels, its tissue, and a picture of the nine
    training datasets it gives (SLIDE_NAME.datasets.png in the working directory)."""
    ap = Parser("Inspect a slide and preview the nine URCDM training datasets it gives.")
    ap.add_argument("slide", help="slide file (.svs, .tif, OME-TIFF, .png, .jpg)")
    ap.add_argument("--preset", default="demo", help="preset whose geometry to use (default: demo)")
    ap.add_argument("--area-size", type=int, default=None,
                    help="level-0 side of the slide's area (default: N3)")
    ap.add_argument("--out", default=None,
                    help="preview PNG (default: SLIDE_NAME.datasets.png in the current directory, "
                         "not beside the slide)")
    ap.add_argument("--cache", default=".urcdm_cache",
                    help="cache directory (default: .urcdm_cache here, never beside the slide)")
    args = ap.parse_args(argv)
    check_ranges(args, {"--area-size": at_least(1)})
    try:
        slide = open_slide(args.slide)
        preset = cascade.get_preset(args.preset)
        print(f"{args.slide}: {slide.dimensions[0]} x {slide.dimensions[1]} px, MPP {slide.mpp}")
        for k, (dim, d) in enumerate(zip(slide.level_dimensions, slide.level_downsamples)):
            print(f"  level {k}: {dim[0]} x {dim[1]} (downsample {d:g})")
        print(f"  tissue fraction (thumbnail): {data.tissue_fraction(slide.thumbnail(1024)):.3f}")
        rows = [dataset_row(data.StageLevelDataset(
            [args.slide], preset, stage, level, area_size=args.area_size,
            cache_dir=args.cache, length=1)[0]) for stage in (1, 2, 3) for level in range(3)]
    except (SlideError, ValueError) as e:
        fail(str(e))
    out = args.out or os.path.basename(args.slide) + ".datasets.png"
    save_png(out, grid_image(rows, 128, gap=2))
    print("preview of the nine datasets (rows: stage 1-3 x level 0-2; target, then lowres (levels "
          f"1-2), context and region (stages 2-3)): {out}")


if __name__ == "__main__":  # python -m operations.previews SLIDE
    inspect_slide()
