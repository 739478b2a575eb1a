"""FLOP counts: every U-Net config (params, forward and forward+backward TFLOP at the sizes that
matter) and a whole slide for every preset, beside the authors' reference numbers.

Not a test. Counted with torch.utils.flop_counter on the meta device (no memory, no compute).
    python tests/bench_flops.py [--steps 50 25 10] [--white 0.0]
    python tests/bench_flops.py --distill [--updates 20000] [--batch 64]   # distillation's cost
"""
import argparse
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cascade  # noqa: E402
import unet  # noqa: E402
from operations.costs import flops  # noqa: E402
from operations import costs  # noqa: E402

# The authors' models, counted the same way on lucidrains' imagen-pytorch U-Nets with their training
# script's settings. Two sources:
#   FIRST: our first count of their models (imagen-pytorch 1.26, stage-3 conditioning), rounded;
#   MEASURED: tests/bench_authors.py on imagen-pytorch 1.26.0 with our stage-3 inputs (context
#   3 channels; the low-resolution image as imagen's lowres_cond): params (M), forward TFLOP at the
#   level's size, forward + backward TFLOP and saved bytes (GiB, fp32, by an older count that also
#   took weights and tensors two ops share: not comparable with costs.saved_bytes) at training size.
AUTHORS = {"paper64": (64, 0.259), "paper256": (256, 0.458), "paper1024": (1024, 12.09)}  # FIRST
AUTHORS_TRAIN_1024_ON_256 = 2.25  # TFLOP, forward + backward, one image (FIRST)
AUTHORS_SLIDE = 7.53e18           # FLOP, a 41344^2 slide at 1024 / 256 / 256 steps (FIRST)
# name: (params M, forward TFLOP, train px, fwd+bwd TFLOP, saved GiB)
AUTHORS_MEASURED = {
    "paper64": (412.9, 0.259, 64, 0.776, 2.51),
    "paper256": (300.5, 0.458, 256, 1.375, 3.24),
    "paper1024": (690.3, 12.085, 256, 2.260, 5.12),
}
# Their forward FLOP exactly, for `paper`'s goal, the authors' size (at or below their FLOPs;
# params within 5 %).
AUTHORS_FORWARD = {"paper64": 258581170176, "paper256": 458476883968, "paper1024": 12085086130176}
# paper_plus's goals, leaner than the authors': forward TFLOP at the level's size (and on the 256 px
# crop) at or below these, params at least the authors' minus 15 %.
GOALS = {"paper64": 0.26, "paper256": 0.46, "paper1024": 12.1}
GOAL_1024_ON_256 = 0.75


def slide_flops(p, steps, white=0.0):
    """FLOP of one slide of preset p at `steps` per level (3) or per stage and level (9); `white` =
    share of stage-3 patches filled."""
    sp, total = cascade.Sampling(steps=tuple(steps)), 0.0
    for s in (1, 2, 3):
        n = p.n_patches[s - 1] ** 2 * (1 - white if s == 3 else 1)
        total += n * sum(flops(cascade.unet_config(p, s, lvl), L) * sp.level_steps(s, lvl)
                         for lvl, L in enumerate(p.level_sizes))
    return total


def unet_rows(p, lvl, name, ok):
    """One U-Net's params, forward and training FLOPs and saved bytes against the authors', with
    the goals: the authors' size for `paper` (params within 5 %, forward FLOPs at or below
    theirs), GOALS for paper_plus's leaner ones."""
    cfg, ref_name = cascade.unet_config(p, 3, lvl), f"paper{p.level_sizes[lvl]}"
    size, ref = AUTHORS[ref_name]
    a_params, a_fwd, a_px, a_fb, a_saved = AUTHORS_MEASURED[ref_name]
    f, params = flops(cfg, size), costs.count_params(cfg) / 1e6
    if p.name == "paper":
        goal_p = f"within 5 %: {ok(abs(params / a_params - 1) <= 0.05)}"
        goal_f = f"at or below theirs: {ok(f <= AUTHORS_FORWARD[ref_name])}"
    else:
        goal_p = f">= 0.85: {ok(params >= 0.85 * a_params)}"
        goal_f = f"<= {GOALS[ref_name]}: {ok(f / 1e12 <= GOALS[ref_name])}"
    print(f"  {name:10s} {params:6.1f} M params (authors {a_params}, ratio "
          f"{params / a_params:.3f}; goal {goal_p})")
    print(f"  {'':10s} forward at {size} px {f / 1e12:.4f} TFLOP (authors {ref} / "
          f"{AUTHORS_FORWARD[ref_name] / 1e12:.4f}, ratio {f / AUTHORS_FORWARD[ref_name]:.4f}; "
          f"goal {goal_f})")
    L = p.training.crop if ref_name == "paper1024" else size
    fb = flops(cfg, L, True)
    act32, w32 = costs.saved_bytes(cfg, L)
    act16, w16 = costs.saved_bytes(cfg, L, bf16=True)
    print(f"  {'':10s} at {L} px: fwd+bwd {fb / 1e12:.3f} TFLOP (authors {a_fb}, ratio "
          f"{fb / 1e12 / a_fb:.2f}); saved for backward, one image: {act32 / 2 ** 30:.2f} GiB "
          f"fp32, {act16 / 2 ** 30:.2f} GiB under CUDA's bf16 autocast policy; weights "
          f"(and their bf16 casts) once a step: {w32 / 2 ** 30:.2f} / {w16 / 2 ** 30:.2f} GiB")
    if ref_name == "paper1024" and p.name != "paper":
        fc = flops(cfg, L)
        print(f"  {'':10s} on its {L} px training crop: forward {fc / 1e12:.3f} TFLOP (goal <= "
              f"{GOAL_1024_ON_256}: {ok(fc / 1e12 <= GOAL_1024_ON_256)}), fwd+bwd ratio to "
              f"the authors' {AUTHORS_TRAIN_1024_ON_256}: "
              f"{fb / 1e12 / AUTHORS_TRAIN_1024_ON_256:.2f}")


def distill_cost(preset, plan, updates, batch, rate=312e12 * 0.4):
    """GPU-hours of progressive distillation (arithmetic): per round, `updates` steps of `batch`
    examples, each a student forward + backward and two teacher forwards at the level's training
    size (the top level: its crop), on A100s at 40 % of 312 TFLOP/s bf16. plan: {level: rounds}.
    Returns [(level, rounds, FLOP an example, GPU-hours of its rounds, all three stages)]."""
    p, rows = cascade.get_preset(preset), []
    for lvl, rounds in plan.items():
        L = p.level_sizes[lvl]
        size = min(L, p.training.crop) if lvl == len(p.level_sizes) - 1 else L
        cfg = cascade.unet_config(p, 3, lvl)
        per_example = flops(cfg, size, backward=True) + 2 * flops(cfg, size)
        rows.append((lvl, rounds, per_example,
                     3 * rounds * updates * batch * per_example / rate / 3600))
    return rows


def distill_main(args):
    # paper_plus at 256 / 64 / 48 steps, distilled to 8 a level: DDIM teachers of 256 -> 8 (5
    # rounds), 64 -> 8 (3), 64 -> 8 (3; 48 rounded up to the grid of halvings)
    plan = {0: 5, 1: 3, 2: 3}
    print(f"paper_plus distilled to 8 steps a level: {args.updates} updates of batch {args.batch} "
          "a round, each example a student forward + backward and 2 teacher forwards, A100s at "
          "40 % of 312 TFLOP/s bf16 (arithmetic); the three stages' models alike:")
    total = 0.0
    for lvl, rounds, per_example, hours in distill_cost("paper_plus", plan, args.updates,
                                                         args.batch):
        total += hours
        print(f"  level {lvl}: {rounds} rounds, {per_example / 1e12:.3f} TFLOP an example, "
              f"{hours:.0f} GPU-hours for its 3 models")
    print(f"  all nine models: {total:.0f} GPU-hours ({total / 8:.0f} h on 8 GPUs); the paper "
          "trained them in 9 x 24 = 216 GPU-hours")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--distill", action="store_true",
                    help="print progressive distillation's cost for paper_plus instead")
    ap.add_argument("--updates", type=int, default=20000, help="updates a distillation round")
    ap.add_argument("--batch", type=int, default=64, help="global batch of a distillation round")
    ap.add_argument("--steps", type=int, nargs="+", default=None,
                    help="steps per level (3) or per stage and level (9) (default: each preset's)")
    ap.add_argument("--white", type=float, default=0.0,
                    help="share of stage-3 patches filled as glass")
    args = ap.parse_args()
    if args.distill:
        return distill_main(args)
    ok = lambda cond: "met" if cond else "NOT met"
    for preset in ("paper", "paper_plus"):
        p = cascade.get_preset(preset)
        print(f"{preset}'s U-Nets (stage-3 conditioning); authors = our first count / "
              "tests/bench_authors.py's measurement:")
        for lvl, name in enumerate(p.unets):
            unet_rows(p, lvl, name, ok)
    for name in ("demo_base", "demo", "tiny"):
        cfg = unet.get_config(name, cond_ch=9)
        print(f"  {name:10s} {costs.count_params(cfg) / 1e6:6.2f} M params")
    print("Whole slides:")
    for name, p in cascade.PRESETS.items():
        steps = args.steps or p.sampling.steps
        total = slide_flops(p, steps, args.white)
        ref = (f" (authors {AUTHORS_SLIDE:.2e}, ratio {total / AUTHORS_SLIDE:.2f})"
               if p.patch == 1024 else "")

        print(f"  {name:10s} {cascade.stage_size(p, 3)}^2 px at steps {tuple(steps)}: {total:.3g} "
              f"FLOP{ref}; 9 A100s (312 TFLOP/s bf16) at 40 % MFU: "
              f"{total / (9 * 312e12 * 0.4) / 3600:.2f} h")


if __name__ == "__main__":
    main()
