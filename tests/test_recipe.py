"""``train --recipe MODEL``: a model's TrainConfig as the defaults of a new run (no Ray here: the
options, the checks' view of them and the config the run gets)."""

import ast
import inspect
from dataclasses import replace

import pytest
from conftest import write_checkpoint

from raysegment.cli import args as args_module
from raysegment.cli import recipe as recipe_module
from raysegment.cli import train as train_cli
from raysegment.config import AugmentConfig, LossConfig
from raysegment.data.prepare import load_manifest


def _run_config(argv):
    """What ``train`` would run with (``main`` up to where Ray starts)."""
    p = train_cli.build_parser()
    a, recipe = recipe_module.apply_recipe(p, argv, p.parse_args(argv))
    config = train_cli.config_from_args(a)
    return (recipe_module.with_recipe(config, recipe) if recipe else config), a, recipe


def test_a_recipe_is_the_defaults_the_command_line_wins_and_the_rest_comes_along(tmp_path, tiny_model, sample_shards):
    model, config = tiny_model
    made = replace(config, data="/elsewhere/shards", lr=5e-4, batch_size=4, seed=7, val_every=3, epochs=40,
                   time_budget_min=90.0, weight_decay=3e-4, warmup_epochs=2.0, threads_per_worker=2,
                   manifest_hash="0123456789abcdef",
                   loss=LossConfig(class_weights=(2.0, 1.0, 1.0)),
                   augment=AugmentConfig(rotation_deg=33.0, gamma=(0.8, 1.25), flip_prob=0.5))
    ckpt = write_checkpoint(tmp_path / "ckpt", model, made)
    run, a, recipe = _run_config(["--recipe", str(ckpt), "--data", str(sample_shards), "--lr", "1e-3", "--seed", "3"])
    # Given on the command line: those values; the rest of the options: the recipe's.
    assert (run.lr, run.seed) == (1e-3, 3)
    assert (run.batch_size, run.val_every, run.epochs, run.time_budget_min) == (4, 3, 40, 90.0)
    assert run.loss.class_weights == (2.0, 1.0, 1.0) and run.augment.rotation_deg == 33.0 and run.augment.flip_prob == 0.5
    assert run.model == made.model
    assert a.batch_size == 4 and a.flip_prob == 0.5  # what check_args sees is what runs
    # No option for them: the recipe's as they are.
    assert (run.weight_decay, run.warmup_epochs, run.augment.gamma) == (3e-4, 2.0, (0.8, 1.25))
    # The command's: its data (the manifest set from it when the run starts) and this machine's threads.
    assert run.data == str(sample_shards.resolve()) and run.manifest_hash == "" and run.threads_per_worker is None
    line = recipe_module.recipe_line(str(ckpt), recipe, run)
    assert line.startswith(f"[raysegment] the recipe of {ckpt} but for --lr --seed: mobilenet_v2, batch 4, lr 0.001")
    assert line.endswith(", 90 min, at most 40 epochs, seed 3; the recipe trained on data 0123456789ab, --data is "
                         f"{load_manifest(sample_shards)['content_hash'][:12]}")
    # The shipped model's own recipe, as its README says it was made.
    run, *_ = _run_config(["--recipe", "shipped:mobilenet_v2", "--data", str(sample_shards)])
    assert (run.time_budget_min, run.epochs, run.val_every, run.seed, run.init_weights) == (140.0, 1000, 5, 0, None)


def test_a_recipe_that_cannot_be_read_or_fine_tuned_from_a_missing_file_is_one_line(tmp_path, tiny_model, sample_shards,
                                                                                     capsys):
    model, config = tiny_model
    for argv, says in (
            (["--recipe", str(tmp_path / "none")], "--recipe " + str(tmp_path / "none") + ": no recipe to read (FileNotFoundError"),
            (["--recipe", str(write_checkpoint(tmp_path / "ft", model, replace(config, init_weights="/gone/w.safetensors")))],
             "fine-tuned from /gone/w.safetensors, which is not on this machine: give that file as --init-weights")):
        with pytest.raises(SystemExit) as exit_:
            _run_config([*argv, "--data", str(sample_shards)])
        assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_every_option_that_sets_the_config_is_a_recipe_option():
    """An option missing from ``OPTION_FIELDS`` would be ignored beside ``--recipe``; one listed there
    that sets nothing would be stale: the options ``config_from_args`` reads are exactly those."""
    read = set()
    for fn in (train_cli.config_from_args, args_module.augment_from_args):
        tree = ast.parse(inspect.getsource(fn))
        read |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                 and n.value.id == "a"}
    assert read - {"data", "threads"} == set(recipe_module.OPTION_FIELDS)
    assert set(recipe_module.COMMAND_FIELDS) == {"data", "threads_per_worker", "manifest_hash"}
