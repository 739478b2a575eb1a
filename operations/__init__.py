"""Operations: what runs URCDM for a day at paper scale; the algorithm lives in the eight component
files. Two layers, each importing only downward (tests/test_style.py holds this):

LOWER knows nothing of the model (EDM's torch_utils / dnnlib): files, slides in and out, the
stage-image caches, the loader's fast resize, ranks, flags, feature-network files, logs. It imports
no top-level module of the project; data.py imports only this layer.

UPPER is the commands' machinery: a streamed sampling run (runs, its journal and transfers),
windows, many slides, settings resolved from flags, recipes, costs, model files and checkpoints,
training's upkeep, previews, evaluation's plumbing. It may import the component files and LOWER.

The four model files (sde, unet, cascade, tiler) import neither."""

LOWER = ("aperio", "caches", "distributed", "features", "files", "flags", "logs", "pyramid",
         "slides")
UPPER = ("checkpoints", "costs", "evaluation", "journal", "many", "previews", "recipes", "runs",
         "settings", "training", "transfer", "windows")
