"""Recipes: the list of train.py runs (phases) that made a set of models, in a text file, run in
order by `train.py --recipe FILE` (the shipped demo's: checkpoints/demo/recipe.txt), then
exported."""
import shlex

from operations import checkpoints, settings
from operations.flags import fail

# A recipe is the list of train.py runs (phases) that made a set of models, in a text file: '#'
# comments, one line `common: FLAGS` given to every phase, then one line of flags per phase. A phase
# trains its models up to its --max-steps and resumes exactly, so re-running the command continues
# where it stopped and a finished phase is skipped. Only these flags may be given beside --recipe;
# everything else is the recipe's.
RECIPE_FLAGS = ("data", "out", "cache", "threads", "device", "export")


def check_recipe_flags(args, parser):
    """--recipe sets its own flags: only RECIPE_FLAGS may be given beside it."""
    extra = [k for k, v in vars(args).items()
             if k not in RECIPE_FLAGS + ("recipe",) and v != parser.get_default(k)]
    if extra:
        fail(f"--recipe {args.recipe} sets its own flags; drop --{extra[0].replace('_', '-')} "
             f"(only --{', --'.join(f.replace('_', '-') for f in RECIPE_FLAGS)} may be given "
             "with it)")


def read_recipe(path):
    """(common flags, [flags of each phase]) of a recipe file."""
    try:
        with open(path) as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as e:
        fail(f"--recipe {path}: {e.strerror}; give a recipe file such as "
             "checkpoints/demo/recipe.txt")
    if not lines or not lines[0].startswith("common:") or len(lines) < 2:
        fail(f"--recipe {path}: expected a line 'common: FLAGS', then one line of flags per phase")
    return shlex.split(lines[0][len("common:"):]), [shlex.split(ln) for ln in lines[1:]]


def run_recipe(args, parse_args, train_models):
    """train.py --recipe: each phase of the recipe file as its own training run
    (train_models(parse_args(flags))), then --export of all nine models."""
    common, phases = read_recipe(args.recipe)
    mine = [f for k in RECIPE_FLAGS if k != "export" and getattr(args, k) is not None
            for f in (f"--{k}", str(getattr(args, k)))]
    for i, phase in enumerate(phases):
        argv = common + phase + mine
        print(f"recipe {args.recipe}, phase {i + 1}/{len(phases)}: train.py {shlex.join(argv)}",
              flush=True)
        if train_models(parse_args(argv)) is False:
            return print(f"recipe {args.recipe}: stopped in phase {i + 1}; the same command "
                         "continues it")
    if args.export:
        every = parse_args(common + ["--stage", "all", "--level", "all", "--out", args.out])
        checkpoints.export(settings.export_sources(every), args.export)
