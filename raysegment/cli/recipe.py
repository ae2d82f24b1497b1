"""``train --recipe MODEL``: train again with the recipe a model carries (its ``TrainConfig``): a
shipped or registered model's run repeated by one command (the same recipe; with a time budget, not
the same weights on another machine). The recipe's values become the options'
defaults (options given on the command line win, and every check sees the values the run will use);
what the command line has no option for (weight decay, warm-up, the other augmentations, …) comes
from the recipe as it is. The data, the threads and everything about where the run goes stay the
command's.

Imports ``cli.args``, ``inference`` (resolving the reference), ``model``, ``data`` (the manifest) and
``config``. Top layer: no stage imports it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from raysegment.config import TrainConfig

# Each option of ``train`` that sets a TrainConfig field → the field's path in ``TrainConfig.to_dict()``.
OPTION_FIELDS: dict[str, tuple[str, ...]] = {
    "backbone": ("model", "backbone"), "decoder_width": ("model", "decoder_width"),
    "context_slices": ("model", "context_slices"), "deep_supervision": ("model", "deep_supervision"),
    "ce_weight": ("loss", "ce_weight"), "dice_weight": ("loss", "dice_weight"),
    "class_weights": ("loss", "class_weights"), "flip_prob": ("augment", "flip_prob"),
    "rotation_deg": ("augment", "rotation_deg"), "scale": ("augment", "scale"), "epochs": ("epochs",),
    "minutes": ("time_budget_min",), "batch_size": ("batch_size",), "lr": ("lr",), "image_size": ("image_size",),
    "crop_size": ("crop_size",), "pixel_mm": ("pixel_mm",), "val_every": ("val_every",),
    "max_steps_per_epoch": ("max_steps_per_epoch",), "precision": ("precision",), "weights": ("weights",),
    "seed": ("seed",), "init_weights": ("init_weights",),
}
# The run's place, not its recipe: the data it reads, the torch threads of this machine, and the
# data manifest (set from --data when the run starts).
COMMAND_FIELDS = ("data", "threads_per_worker", "manifest_hash")


def _at(d: dict, path: tuple[str, ...]):
    for key in path:
        d = d[key]
    return d


def load_recipe(ref: str, tracking_uri: str | None) -> TrainConfig:
    """The TrainConfig ``ref`` carries (``shipped:B``, a weights file, a checkpoint or run folder,
    ``models:/NAME/VERSION`` or ``@ALIAS``); ValueError for an ensemble, which has no one recipe."""
    from raysegment.inference.predictor import _local_path, is_registry_uri, registered_folders
    from raysegment.model.weights import saved_config

    if not is_registry_uri(ref):
        return saved_config(_local_path(ref))
    with tempfile.TemporaryDirectory() as tmp:
        folders = registered_folders(ref, tracking_uri, tmp)
        if len(folders) != 1:
            raise ValueError(f"{ref} is an ensemble of {len(folders)} models: give one of its members as --recipe")
        return saved_config(folders[0])


def recipe_defaults(recipe: TrainConfig) -> dict:
    """``parser.set_defaults`` keywords that make each option default to the recipe's value."""
    d = recipe.to_dict()
    return {dest: _at(d, path) for dest, path in OPTION_FIELDS.items()}


def with_recipe(config: TrainConfig, recipe: TrainConfig) -> TrainConfig:
    """``config`` (built from the options, which default to the recipe's values) with every field no
    option sets taken from ``recipe``; the data, threads and manifest stay ``config``'s."""
    mine, merged = config.to_dict(), recipe.to_dict()
    for path in [*OPTION_FIELDS.values(), *((f,) for f in COMMAND_FIELDS)]:
        *parents, key = path
        _at(merged, tuple(parents))[key] = _at(mine, tuple(parents))[key]
    return TrainConfig.from_dict(merged)


def apply_recipe(p: argparse.ArgumentParser, argv: list[str] | None, a: argparse.Namespace) -> tuple:
    """(args parsed again with the recipe's defaults, the recipe), or (``a``, None) without ``--recipe``."""
    if not a.recipe:
        return a, None
    from raysegment.cli.args import check_registry

    check_registry(a)  # a models:/ recipe: exit 1, in one line, where the server does not answer
    try:
        recipe = load_recipe(a.recipe, a.mlflow_uri)
    except Exception as exc:  # a missing file, no such version, an ensemble
        p.error(f"--recipe {a.recipe}: no recipe to read ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})")
    p.set_defaults(**recipe_defaults(recipe))
    a = p.parse_args(argv)
    if a.init_weights and a.init_weights == recipe.init_weights and not Path(a.init_weights).exists():
        p.error(f"--recipe {a.recipe} fine-tuned from {recipe.init_weights}, which is not on this machine: "
                f"give that file as --init-weights")
    return a, recipe


def recipe_line(ref: str, recipe: TrainConfig, config: TrainConfig) -> str:
    """What the run takes from the recipe (``config``: the run's), what the command changed, and whether
    the recipe trained on the same data."""
    from raysegment.data.prepare import load_manifest

    mine, theirs = config.to_dict(), recipe.to_dict()
    changed = [f"--{dest.replace('_', '-')}" for dest, path in OPTION_FIELDS.items() if _at(mine, path) != _at(theirs, path)]
    c, but = config, (" but for " + " ".join(changed) if changed else "")
    line = (f"[raysegment] the recipe of {ref}{but}: "
            f"{c.model.backbone}, batch {c.batch_size}, lr {c.lr:g}, crop {c.crop_size}, "
            f"{f'{c.time_budget_min:g} min, at most ' if c.time_budget_min else ''}{c.epochs} epochs, seed {c.seed}")
    try:
        here = load_manifest(c.data).get("content_hash", "")
    except (FileNotFoundError, ValueError):  # a bundle (--local): no manifest
        return line
    if recipe.manifest_hash and here and here != recipe.manifest_hash:
        line += f"; the recipe trained on data {recipe.manifest_hash[:12]}, --data is {here[:12]}"
    return line
