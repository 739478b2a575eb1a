"""Many slides from one command (sample.py --slides N / --seeds): one slide a seed, split across
ranks, each made by runs.generate; records and a manifest; a rerun makes only what is missing."""
import argparse
import json
import os
import socket
import sys
import time

from operations.distributed import gather
from operations.files import file_digest, write_json
from operations.flags import SEED_MAX, fail
from operations.runs import SlideSkipped, generate, remove_own_orphans


MAX_SLIDES = 10 ** 6


def parse_seeds(args):
    """The seeds of --slides N (from --seed on) or --seeds '0-99' / '0,4,7': at most MAX_SLIDES,
    each a valid seed."""
    if args.slides:
        seeds = range(args.seed, args.seed + args.slides)
    else:
        try:
            parts = [p.partition("-") for p in args.seeds.split(",")]
            seeds = [range(int(a), int(b or a) + 1) for a, _, b in parts]
        except ValueError:
            fail(f"--seeds {args.seeds}: use a range such as 0-99 or a list such as 0,4,7")
        if sum(len(r) for r in seeds) > MAX_SLIDES or any(r.start < 0 for r in seeds):
            fail(f"--seeds {args.seeds}: at most {MAX_SLIDES} slides, seeds from 0")
        seeds = [s for r in seeds for s in r]
    if seeds and max(seeds) > SEED_MAX:
        fail(f"--seed {args.seed}: the seeds must stay below 2^63")
    return list(seeds)


def made_files(product):
    """{file name: bytes} of what a run of OUT made beside it: the slide and its lower stages, or
    (product OUT.windows.json) the windows, their fields below and the manifest itself."""
    folder, names = os.path.dirname(product), [os.path.basename(product)]
    if product.endswith(".windows.json"):
        with open(product) as f:
            m = json.load(f)
        names += list(m["stages"].values()) + [w["file"] for w in m["windows"]] + [
            low["file"] for w in m["windows"] for low in w["lower"].values()]
    else:
        names += [f"{names[0]}.stage{s}.png" for s in (1, 2)
                  if os.path.exists(f"{product}.stage{s}.png")]
    return {n: os.path.getsize(os.path.join(folder, n)) for n in names}


def intact(rec, product):
    """Whether every file a slide's record lists is there, whole (its size as recorded)."""
    folder = os.path.dirname(product)
    return os.path.exists(product) and all(
        os.path.isfile(os.path.join(folder, n)) and os.path.getsize(os.path.join(folder, n)) == b
        for n, b in rec.get("files", {os.path.basename(product): None}).items() if b is not None)


def many_slides(args, device, rank, world):
    """One slide per seed, whole slides split across ranks (each rank alone on its slides, in its
    own machine's file system). A seed whose record (OUT_s<seed>.tif.json) and every file it lists
    are there is skipped; any other is made (again), resuming its own unfinished run. Rank 0 writes
    OUT.manifest.json, one record per slide: seed, host (the machine that holds the slide), path,
    settings, seconds, patches generated / filled, the files made (bytes), the product's sha256.
    A seed that cannot be made (SlideSkipped) gets one line, and the others go on."""
    seeds, (root, ext) = parse_seeds(args), os.path.splitext(args.out)
    if args.slides is not None and args.slides < 1:
        fail(f"--slides {args.slides}: use a value >= 1")
    if rank == 0:
        remove_own_orphans(args.out)
    records, skipped = [], []
    for seed in seeds[rank::world]:
        out = f"{root}_s{seed}{ext}"
        rec_path = out + ".json"
        product = f"{out}.windows.json" if args.window or args.patches else out  # what is kept
        if os.path.exists(rec_path):
            with open(rec_path) as f:
                rec = json.load(f)
            if intact(rec, product):
                records.append(rec)
                print(f"{out}: done already, skipped", file=sys.stderr)
                continue
            print(f"{out}: a file its record lists is missing or cut; making it again",
                  file=sys.stderr)
        # the seed's own names: an earlier attempt's files are replaced, its work resumed
        one = argparse.Namespace(**{**vars(args), "out": out, "seed": seed, "seeds": None,
                                    "slides": None, "resume": True, "overwrite": True})
        t0 = time.time()
        try:
            journal = generate(one, device)
        except SlideSkipped as e:
            print(f"error: {e}", file=sys.stderr)
            skipped.append(seed)
            continue
        stages = journal.stages()
        rec = {"seed": seed, "host": socket.gethostname(), "rank": rank,
               "path": os.path.abspath(product), "settings": journal.settings(),
               "seconds": time.time() - t0,
               "patches": {str(s): v[0] for s, v in stages.items()},
               "filled": {str(s): v[1] for s, v in stages.items()},
               "files": made_files(product), "sha256": file_digest(product)}
        write_json(rec_path, rec, indent=1)
        records.append(rec)
    records = gather(records, rank, world) if world > 1 else records
    skipped = gather(skipped, rank, world) if world > 1 else skipped
    if rank == 0:
        hosts = sorted({r["host"] for r in records})
        write_json(args.out + ".manifest.json", sorted(records, key=lambda r: r["seed"]),
                   indent=1)
        print(f"wrote {args.out}.manifest.json: {len(records)} slides on {len(hosts)} machine(s) "
              f"({', '.join(hosts)}); each slide stays on the machine that made "
              "it", file=sys.stderr)
        if skipped:
            fail(f"{len(skipped)} of {len(seeds)} seeds made no slide (seeds "
                 f"{', '.join(map(str, sorted(skipped)))}; their lines above say why)")
