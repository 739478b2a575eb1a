"""Generate a whole synthetic slide with URCDM and write it as a pyramidal BigTIFF.

    python sample.py --out slide.tif                  # the demo preset with the shipped models
    python sample.py --preset paper --ckpt CKPT_DIR --out slide.svs --order wavefront --batch 16
    torchrun --nproc_per_node=8 sample.py ...          # each round's patches split across ranks
    python sample.py --preset paper --dry-run --out x.tif   # full geometry, cheap stand-in models

Stage 1 generates the whole slide at N1 px; stages 2 and 3 each generate an overlapping grid
of patches conditioned on the stage below (tiler.py). Stage images live in files under
OUT.work/ (never all in memory), with a journal of finished patches: after a crash,
--resume continues and produces the same slide, bit for bit on CPU.

Output format (DESIGN §6): Aperio-style tiled BigTIFF that OpenSlide (vendor 'aperio'),
QuPath and tifffile read: page 0 = level 0 (tiled), page 1 = stripped thumbnail, then each
x2-smaller level as its own tiled page, ImageDescription 'Aperio Image Library ...|MPP = ..'.

References
  [PAPER]     Cechnicka et al., URCDM, MICCAI 2024 (Sec. 2, Fig. 1).
  [Aperio]    OpenSlide's Aperio format notes, https://openslide.org/formats/aperio/
  [tifffile]  TiffWriter.write with tile iterators, https://github.com/cgohlke/tifffile
"""
import argparse
import dataclasses
import json
import math
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
import tiler

DEMO_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "demo")


class DiskArray:
    """An (H, W, 3) uint8 image in a .npy file, read and written with pread / pwrite.

    Unlike np.memmap, touched pages do not stay mapped into the process, so the resident
    memory stays at the size of the windows in flight however large the image is. Supports
    the tiler's canvas interface (read / write), row-band slicing img[r0:r1] and 2-D windows
    img[y0:y1, x0:x1] (what cascade.window, region_crop and write_aperio use)."""

    def __init__(self, path, shape=None, fill=None):
        # shape given: create the file (sparse, zero-filled; `fill` writes a grey level).
        if shape is not None:
            np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=tuple(shape))
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            self.shape, _, dtype = read_header(f)
            self.offset = f.tell()
        if dtype != np.uint8 or len(self.shape) != 3:
            raise ValueError(f"{path}: not an (H, W, 3) uint8 image file")
        self.path, self.fd = path, os.open(path, os.O_RDWR)
        self.row_bytes = self.shape[1] * 3
        if fill is not None:
            band = np.full((min(256, self.shape[0]), self.shape[1], 3), fill, np.uint8)
            for r0 in range(0, self.shape[0], band.shape[0]):
                self.write(r0, 0, band[:self.shape[0] - r0])

    def read(self, y0, x0, h, w):
        out = np.empty((h, w, 3), np.uint8)
        if w == self.shape[1] and x0 == 0:  # whole rows: one read
            buf = os.pread(self.fd, h * self.row_bytes, self.offset + y0 * self.row_bytes)
            return np.frombuffer(buf, np.uint8).reshape(h, w, 3).copy()
        for r in range(h):
            buf = os.pread(self.fd, w * 3, self.offset + (y0 + r) * self.row_bytes + x0 * 3)
            out[r] = np.frombuffer(buf, np.uint8).reshape(w, 3)
        return out

    def write(self, y0, x0, arr):
        arr = np.ascontiguousarray(arr, dtype=np.uint8)
        h, w = arr.shape[:2]
        if w == self.shape[1] and x0 == 0:
            os.pwrite(self.fd, arr.tobytes(), self.offset + y0 * self.row_bytes)
            return
        for r in range(h):
            os.pwrite(self.fd, arr[r].tobytes(), self.offset + (y0 + r) * self.row_bytes + x0 * 3)

    def _box(self, idx):
        ys, xs = idx if isinstance(idx, tuple) else (idx, slice(None))
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        return y0, x0, max(y1 - y0, 0), max(x1 - x0, 0)

    def __getitem__(self, idx):
        return self.read(*self._box(idx))

    def __setitem__(self, idx, value):
        y0, x0, _, _ = self._box(idx)
        self.write(y0, x0, value)

    def flush(self):
        os.fsync(self.fd)

    def close(self):
        os.close(self.fd)


def halve(src, dst, band=512):
    """dst = 2x2 area average of src (edge-replicated when odd), band by band.
    src: (H, W, 3) uint8 array-like; dst: (ceil(H/2), ceil(W/2), 3) uint8 array-like."""
    H, W = src.shape[:2]
    for r0 in range(0, H, band):
        b = np.asarray(src[r0:r0 + band], dtype=np.float32)
        b = np.pad(b, ((0, b.shape[0] % 2), (0, W % 2), (0, 0)), mode="edge")
        avg = b.reshape(b.shape[0] // 2, 2, b.shape[1] // 2, 2, 3).mean(axis=(1, 3))
        dst[r0 // 2:r0 // 2 + avg.shape[0]] = np.round(avg).astype(np.uint8)


def _tiles(src, tile):
    """Row-major tiles (tile, tile, 3) of an array-like, edge tiles padded; reads one band at a time."""
    H, W = src.shape[:2]
    for r0 in range(0, H, tile):
        band = np.asarray(src[r0:r0 + tile])
        band = np.pad(band, ((0, tile - band.shape[0]), (0, (-W) % tile), (0, 0)), mode="edge")
        for c0 in range(0, band.shape[1], tile):
            yield band[:, c0:c0 + tile]


def write_aperio(path, image, *, tile=256, mpp=0.25, compression="jpeg", quality=90, min_side=1024,
                 workdir=None, thumb_side=768):
    """Write an (N, M, 3) uint8 array-like (array or memmap, read band by band) as an
    Aperio-style pyramidal tiled BigTIFF at `path`. Lower levels are built x2 at a time into
    temporary files under `workdir` (default: beside `path`), so memory stays bounded.
    compression: 'jpeg' (needs imagecodecs) or 'zlib'."""
    if compression not in ("jpeg", "zlib"):
        raise ValueError(f"compression {compression!r}: use 'jpeg' or 'zlib'")
    H, W = image.shape[:2]
    workdir = workdir or os.path.dirname(os.path.abspath(path))
    levels, temps = [image], []
    while max(levels[-1].shape[:2]) > min_side:
        h, w = (math.ceil(s / 2) for s in levels[-1].shape[:2])
        tmp = os.path.join(workdir, f".{os.path.basename(path)}.level{len(levels)}.npy")
        nxt = DiskArray(tmp, (h, w, 3))
        halve(levels[-1], nxt)
        levels.append(nxt)
        temps.append(tmp)
    small = np.asarray(levels[-1][:])
    th = max(1, round(small.shape[0] * thumb_side / max(small.shape[:2])))
    tw = max(1, round(small.shape[1] * thumb_side / max(small.shape[:2])))
    thumb = np.asarray(Image.fromarray(small).resize((tw, th), Image.BOX))
    codec = dict(compression=compression, compressionargs={"level": quality if compression == "jpeg" else 6})
    q = f"{compression.upper()}/RGB Q={quality}" if compression == "jpeg" else "ZLIB/RGB"
    props = f"AppMag = {10 / mpp:g}|MPP = {mpp:g}|Software = URCDM"
    head = f"Aperio Image Library v12.0.0 URCDM synthetic slide\r\n{W}x{H} [0,0 {W}x{H}] ({tile}x{tile})"
    try:
        with tifffile.TiffWriter(path, bigtiff=True) as tif:
            for k, lv in enumerate(levels):
                h, w = lv.shape[:2]
                desc = f"{head} {q}|{props}" if k == 0 else f"{head} -> {w}x{h} {q}"
                tif.write(_tiles(lv, tile), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                          description=desc, metadata=None, subfiletype=0, buffersize=tile * tile * 3 * 64, **codec)
                if k == 0:  # page 1: the stripped thumbnail
                    tif.write(thumb, photometric="rgb", description=f"{head} -> {tw}x{th} - |{props}",
                              metadata=None, **codec)
    finally:
        for lv in levels[1:]:
            lv.close()
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)


def native_bf16(device):
    """Whether bf16 autocast is fast here: CUDA, or a CPU with bf16 units (AVX512-BF16 / AMX)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# ----------------------------------------------------------------------------- the dry-run stand-in

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


# ----------------------------------------------------------------------------- the job

SETTINGS = ("preset", "seed", "sampler", "steps", "order", "batch", "white_threshold", "outpaint", "resample",
            "dry_run", "ckpt", "stages", "precision", "aug_level", "edge_margin",
            "feather")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output slide (.tif or .svs): Aperio-style pyramidal BigTIFF")
    ap.add_argument("--ckpt", default=None, help=f"directory with stage{{s}}_level{{l}}.pt (default: {DEMO_CKPT})")
    ap.add_argument("--preset", default="demo", help="geometry and models: demo (CPU) or paper")
    ap.add_argument("--seed", type=int, default=0, help="the slide's seed; every patch's noise derives from it")
    ap.add_argument("--sampler", default=None, choices=["ancestral", "ddim", "dpmpp2m"], help="default: the preset's")
    ap.add_argument("--steps", type=int, nargs=3, default=None, metavar=("L0", "L1", "L2"),
                    help="sampling steps per level (default: the preset's)")
    ap.add_argument("--resample", type=int, default=1, help="RePaint resampling jumps per step (1 = off)")
    ap.add_argument("--aug-level", type=float, default=None,
                    help="conditioning augmentation level t_aug at sampling (default: the preset's)")
    ap.add_argument("--edge-margin", type=int, default=None,
                    help="px at a patch's inner edges that the next patch redraws instead of holding fixed "
                         "(default: the preset's, overlap / 8; 0 = hold the whole overlap as the paper)")
    ap.add_argument("--feather", type=int, default=None,
                    help="px over which a neighbour's known pixels fade into the new patch "
                         "(default: the preset's, overlap / 8; 0 = pasted exactly as the paper)")
    ap.add_argument("--order", default="wavefront", choices=tiler.ORDERS,
                    help="raster (the paper), wavefront (same slide, 136 rounds at paper size), checkerboard (4 rounds, different slide)")
    ap.add_argument("--batch", type=int, default=8, help="patches per U-Net batch (a run's slide depends on it on CPU)")
    ap.add_argument("--stages", type=int, default=3, choices=[1, 2, 3], help="stop after this stage")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run (OUT.work/)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out and discard OUT.work/")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="U-Net arithmetic: auto = bf16 autocast on CUDA and on CPUs with native bf16 (AMX / AVX512-BF16, ~2x faster), else fp32")
    ap.add_argument("--white-threshold", type=float, default=data.MIN_TISSUE,
                    help="patches whose region is less tissue than this are filled from the stage below, "
                         "as training leaves such crops out (default: the same rule, data.MIN_TISSUE; 0: off)")
    ap.add_argument("--mpp", type=float, default=0.25, help="microns per pixel written into the slide (level 0)")
    ap.add_argument("--compression", default="jpeg", choices=["jpeg", "zlib"], help="tile compression")
    ap.add_argument("--outpaint", action="store_true", help="the outpainting baseline: stage-3 models without lower-stage conditioning")
    ap.add_argument("--dry-run", action="store_true", help="cheap deterministic stand-in for the U-Nets (no checkpoints)")
    ap.add_argument("--keep-work", action="store_true", help="keep OUT.work/ (stage images, journal) at the end")
    return ap.parse_args(argv)


class Job:
    def __init__(self, args, rank, world):
        self.args, self.rank, self.world = args, rank, world
        self.preset = cascade.get_preset(args.preset)
        self.work = args.out + ".work"
        self.journal_path = os.path.join(self.work, "journal.json")
        self.settings = {k: getattr(args, k) for k in SETTINGS}
        self.settings["steps"] = list(args.steps or self.preset.steps)
        self.settings["sampler"] = args.sampler or self.preset.sampler
        self.journal = {"settings": self.settings, "done": {}, "skipped": {}, "seconds": {}, "model_seconds": {}}
        self.t_start = time.time()

    # -------------------------------------------------------------- journal
    def load_or_start(self):
        a = self.args
        if os.path.exists(a.out) and not a.overwrite:
            sys.exit(f"error: --out {a.out} exists; pass --overwrite to replace it")
        if os.path.exists(self.journal_path) and a.resume:
            with open(self.journal_path) as f:
                old = json.load(f)
            diff = [k for k in self.settings if old["settings"].get(k) != self.settings[k]]
            if diff:
                sys.exit(f"error: --resume with other settings than the interrupted run ({', '.join(diff)}: "
                         f"{[old['settings'].get(k) for k in diff]} then, {[self.settings[k] for k in diff]} now); "
                         "use the original flags or --overwrite")
            self.journal = old
            return
        if os.path.exists(self.work) and not a.overwrite:
            sys.exit(f"error: {self.work} holds an unfinished run; pass --resume to continue it or --overwrite to restart")
        if a.resume:
            print(f"nothing to resume in {self.work}; starting afresh", file=sys.stderr)
        self.barrier()  # every rank has checked before rank 0 creates the work directory
        if self.rank == 0:
            shutil.rmtree(self.work, ignore_errors=True)
            os.makedirs(self.work)
            self.save_journal()
        self.barrier()

    def save_journal(self):
        if self.rank == 0:
            tmp = self.journal_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.journal, f)
            os.replace(tmp, self.journal_path)

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    # -------------------------------------------------------------- models
    def cdm(self, stage, device):
        if self.args.dry_run:
            return DryRunCDM(self.preset, stage)
        ckpt = self.args.ckpt or DEMO_CKPT
        if not os.path.isdir(ckpt):
            sys.exit(f"error: --ckpt {ckpt}: no such directory. Train the nine models with train.py "
                     f"(see README, 'Training') or pass --dry-run to try the pipeline without models")
        try:
            bf16 = self.args.precision == "bf16" or (self.args.precision == "auto" and native_bf16(device))
            cdm = cascade.load_cdm(ckpt, self.preset, stage, device, bf16=bf16)
            if self.args.aug_level is not None:
                cdm.preset = dataclasses.replace(cdm.preset, aug_sample=self.args.aug_level)
            return cdm
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: --ckpt {e}")

    # -------------------------------------------------------------- stages
    def stage_path(self, s):
        return os.path.join(self.work, f"stage{s}.npy")

    def run_stage1(self, device):
        path, N = self.stage_path(1), cascade.stage_size(self.preset, 1)
        if "1" not in self.journal["done"]:
            t0 = time.time()
            if self.rank == 0:
                x = self.cdm(1, device).sample([tiler.patch_generator(self.args.seed, 1, 0, 0)],
                                               steps=self.settings["steps"], sampler=self.settings["sampler"],
                                               resample=self.args.resample)
                img = DiskArray(path, (N, N, 3))
                img.write(0, 0, cascade.to_uint8(x)[0])
                img.flush()
                self.journal["done"]["1"] = [[0, 0]]
                self.journal["seconds"]["1"] = time.time() - t0
                self.save_journal()
            self.barrier()
            if self.rank != 0:
                with open(self.journal_path) as f:
                    self.journal = json.load(f)
        print(f"stage 1: {N} x {N} done", file=sys.stderr)
        return DiskArray(path)

    def run_grid_stage(self, s, lower, device):
        p, a = self.preset, self.args
        margin = p.edge_margin if a.edge_margin is None else a.edge_margin
        feather = p.feather if a.feather is None else a.feather
        grid = tiler.Grid(p.patch, p.n_patches[s - 1], margin)
        path = self.stage_path(s)
        if self.rank == 0 and not os.path.exists(path):
            DiskArray(path, (grid.size, grid.size, 3), fill=p.background).close()
        self.barrier()
        canvas = DiskArray(path)
        done = [tuple(c) for c in self.journal["done"].get(str(s), [])]
        outpaint = a.outpaint and s == 3
        cdm = self.cdm(s, device)
        total, t0, n0 = grid.n ** 2, time.time(), len(done)
        def sample_fn(gens, **kw):  # the model's share of the time is counted apart
            t = time.time()
            x = cdm.sample(gens, steps=self.settings["steps"], sampler=self.settings["sampler"], resample=a.resample,
                           feather=feather, **kw)
            self.journal["model_seconds"][str(s)] = self.journal["model_seconds"].get(str(s), 0) + time.time() - t
            return x

        def share(chunks):  # batches are cut from the whole round first: any rank count, same slide
            return chunks[self.rank::self.world]

        def on_round(todo, results):
            if self.world == 1:
                return results
            gathered = [None] * self.world
            dist.all_gather_object(gathered, results)
            return [r for part in gathered for r in part]

        def after_round(stats, results):
            if self.rank == 0:
                canvas.flush()  # pixels on disk before the journal says so
                self.journal["done"].setdefault(str(s), []).extend([list(c) for c, _, _ in results])
                self.journal["skipped"].setdefault(str(s), []).extend([list(c) for c, _, sk in results if sk])
                self.journal["seconds"][str(s)] = self.journal["seconds"].get(str(s), 0) + time.time() - self.t_round
                self.save_journal()
                n = len(self.journal["done"][str(s)])
                rate = (n - n0) / max(time.time() - t0, 1e-9)
                print(f"stage {s}: {n}/{total} patches, {len(self.journal['skipped'][str(s)])} skipped as white, "
                      f"{rate:.2f} patches/s, ETA {(total - n) / max(rate, 1e-9) / 60:.1f} min", file=sys.stderr, flush=True)
            self.barrier()
            self.t_round = time.time()

        if self.rank != 0:  # only rank 0 writes the stage image; the others read it
            canvas.write = lambda *args: None
        self.t_round = time.time()
        stats = tiler.generate_stage(
            sample_fn, grid, canvas, stage=s, seed=a.seed, order=a.order, batch=a.batch,
            lower=None if outpaint else lower, zoom=cascade.zoom(p, s), background=p.background,
            white_threshold=0.0 if outpaint else a.white_threshold, tissue_fraction=data.tissue_fraction,
            feather=feather, done=done, share=share, on_round=on_round, after_round=after_round)
        return DiskArray(path), stats

    # -------------------------------------------------------------- output
    def finish(self, images):
        """Write the slide (temp name, then rename) and the preview PNGs; print a summary."""
        a, final = self.args, images[max(images)]
        tmp = a.out + ".tmp"
        t0 = time.time()
        write_aperio(tmp, final, mpp=a.mpp * (cascade.stage_size(self.preset, 3) / final.shape[0]),
                     compression=a.compression, workdir=self.work)
        os.replace(tmp, a.out)
        t_write = time.time() - t0
        previews = write_previews(a.out, images, self.preset)
        if not a.keep_work:
            for img in images.values():
                img.close()
            shutil.rmtree(self.work, ignore_errors=True)
        total = time.time() - self.t_start
        lines = [f"wrote {a.out}: {final.shape[1]} x {final.shape[0]} px, {os.path.getsize(a.out) / 1e6:.1f} MB, "
                 f"{total / 60:.1f} min in this run"]
        for s, secs in sorted(self.journal["seconds"].items()):
            n = len(self.journal["done"].get(s, []))
            sk = len(self.journal["skipped"].get(s, []))
            line = f"  stage {s}: {n} patches in {secs:.1f} s ({n / max(secs, 1e-9):.2f} patches/s)"
            if s in self.journal["model_seconds"]:
                model = self.journal["model_seconds"][s]
                line += (f", {sk} skipped as white ({100 * sk / max(n, 1):.0f} %), outside the model "
                         f"{(secs - model) / max(n, 1):.3f} s/patch (rank 0)")
            lines.append(line)
        lines.append(f"  pyramid written in {t_write:.1f} s; previews: {', '.join(previews)}")
        print("\n".join(lines), file=sys.stderr)


def _fit(arr, side):
    """An (h, w, 3) uint8 array resized to fit side x side, as a PIL image."""
    im = Image.fromarray(arr)
    f = side / max(im.size)
    return im.resize((max(1, round(im.size[0] * f)), max(1, round(im.size[1] * f))), Image.BOX)


def write_previews(out, images, preset, side=512):
    """OUT.preview.png: the paper's Fig. 1 from our own output - stage 1 (whole slide), the
    stage-2 patch at its centre, the stage-3 patch at the centre of that, each with a box
    where the next one sits. OUT.thumbnail.png: the final slide, zoomed out."""
    P, panels, box = preset.patch, [], None
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


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, world, device = cascade.init_distributed(args.device)
    try:
        preset = cascade.get_preset(args.preset)
    except ValueError as e:
        sys.exit(f"error: --preset {e}")
    try:  # checked before any work, by the rule the tiler applies
        tiler.Grid(preset.patch, 1, preset.edge_margin if args.edge_margin is None else args.edge_margin)
    except ValueError as e:
        sys.exit(f"error: --edge-margin (preset {preset.name}): {e}")
    if args.feather is not None and not 0 <= args.feather <= preset.overlap // 2:
        sys.exit(f"error: --feather {args.feather}: use 0 to {preset.overlap // 2} px for preset {preset.name} "
                 f"(at most half its {preset.overlap} px overlap)")
    job = Job(args, rank, world)
    job.load_or_start()
    images = {}
    if args.outpaint:  # the baseline: stage 3 from its neighbours alone
        images[3], _ = job.run_grid_stage(3, None, device)
    else:
        images[1] = job.run_stage1(device)
        for s in range(2, args.stages + 1):
            images[s], _ = job.run_grid_stage(s, images[s - 1], device)
    if rank == 0:
        job.finish(images)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
