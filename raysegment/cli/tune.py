"""``python -m raysegment.tune``: the search command, a thin layer over ``raysegment.training.tune``.
Top layer: may import every stage."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from raysegment.cli import command_parser
from raysegment.cli.args import (
    add_run_arguments,
    augment_from_args,
    check_args,
    check_registry_answers,
    disk_full,
    resolve_init_weights,
    run_until_interrupted,
    unfinished_removed,
)
from raysegment.cli.lost import cluster_gone, watch_cluster
from raysegment.config import LossConfig, ModelConfig, TrainConfig, default_of
from raysegment.data.prepare import sample_shards
from raysegment.io import storage
from raysegment.runtime import ensure_ray
from raysegment.training.train import RunSpec
from raysegment.training.trials import RANGES, check_range, check_value, range_text
from raysegment.training.tune import SEARCHED, SearchSpaceChanged, TuneSpec, finished_search, run_search


def _parse_fixed(items: list[str]) -> dict:
    fixed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in SEARCHED:
            raise ValueError(f"--set {item!r}: expected NAME=VALUE with NAME in {', '.join(SEARCHED)}")
        try:
            fixed[key] = check_value(key, value)
        except ValueError as exc:
            raise ValueError(f"--set {item!r}: {exc}") from None
    return fixed


def _parse_ranges(items: list[str], fixed: dict) -> dict:
    """``--range NAME=LOW:HIGH`` / ``decoder_width=W,W,…`` → {name: bounds}; ValueError on a bad one."""
    ranges = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            bounds = tuple(float(x) for x in value.split("," if key == "decoder_width" else ":")) if sep else ()
        except ValueError:
            bounds = ()
        if not bounds:
            raise ValueError(f"--range {item!r}: expected NAME=LOW:HIGH, or decoder_width=W,W,…")
        try:
            ranges[key] = check_range(key, bounds)
        except ValueError as exc:
            raise ValueError(f"--range {item!r}: {exc}") from None
        if key in fixed:
            raise ValueError(f"--range {item!r}: --set pins {key}")
    return ranges


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m raysegment.tune`` command line (also used to dry-run job specs)."""
    d = lambda name: default_of(TuneSpec, name)  # noqa: E731
    p = command_parser(
        "tune",
        "Search loss weights, learning rate and decoder width with Ray Tune + Optuna + ASHA, track every trial "
        "in MLflow, train the best configuration again (--final-minutes) and register the result as "
        "raysegment-BACKBONE; it becomes @champion only when it beats the current one on the same data. "
        "Without --data: the bundled 6-patient sample and a local MLflow store ./mlflow.db.",
        "python -m raysegment.tune --init-weights shipped",
        "ray job submit -- python -m raysegment.tune --backbone densenet121 --data /data/shards "
        "--mlflow-uri http://mlflow:5000")
    add_run_arguments(p)
    p.add_argument("--data", default=None, help="shards from raysegment.data.prepare (default: the bundled sample)")
    p.add_argument("--mlflow-uri", default=d("tracking_uri"), help="MLflow tracking server or database")
    p.add_argument("--num-samples", type=int, default=d("num_samples"), help="trials")
    p.add_argument("--epochs", type=int, default=3, help="the most epochs per trial (ASHA stops weak trials early)")
    p.add_argument("--concurrency", type=int, default=d("concurrency"), help="trials at once")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPU share per training worker (1; 0.5 runs two small trials on one GPU)")
    p.add_argument("--image-size", type=int, default=None,
                   help=f"pixels (default: {default_of(TrainConfig, 'image_size')}, or that of --init-weights)")
    p.add_argument("--context-slices", type=int, default=None, choices=[0, 1],
                   help="neighbouring slices per side as input channels (default: 0, or that of --init-weights)")
    p.add_argument("--grace-period", type=int, default=d("grace_period"), help="epochs before ASHA may stop a trial")
    p.add_argument("--set", dest="fixed", action="append", default=[], metavar="NAME=VALUE",
                   help=f"pin a searched parameter ({', '.join(SEARCHED)})")
    p.add_argument("--range", dest="ranges", action="append", default=[], metavar="NAME=LOW:HIGH",
                   help="search a parameter over this range instead of its default "
                        f"({', '.join(f'{k} {range_text(v)}' for k, v in RANGES.items())}); decoder_width=W,W,… lists widths")
    p.add_argument("--no-register", action="store_true", help="register nothing: the trial table and MLflow runs only")
    p.add_argument("--final-minutes", type=float, default=d("final_minutes"),
                   help="after the search, train the best trial's configuration from scratch for this many minutes "
                        "and register its last epoch as a final model")
    p.add_argument("--final-epochs", type=int, default=d("final_max_epochs"), help="the most epochs of the final run")
    return p


def trial_lines(trials: list[dict]) -> list[str]:
    """One line per trial of ``training.trials.trial_table``: its parameters, its epochs and the best
    validated one (counted from 1, as the epoch lines are), whose val Dice and checkpoint count."""
    lines = []
    for r in trials:
        params = " ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in SEARCHED if k in r)
        lines.append(f"  {params} epochs={r['epochs']} best epoch {r['best_epoch'] + 1} -> dice rv {r['dice_rv']:.3f} "
                     f"myo {r['dice_myo']:.3f} lv {r['dice_lv']:.3f} mean {r['dice_mean']:.3f}")
    return lines


def _init_settings(p: argparse.ArgumentParser, a, fixed: dict, ranges: dict) -> tuple:
    """(init weights path or None, image size, pixel mm, context slices): the command line's, else
    those the ``--init-weights`` model was trained with, whose decoder width ``fixed`` then pins;
    a setting that model cannot load is an argument error."""
    init = resolve_init_weights(a.init_weights, a.backbone)
    if not init:
        return None, a.image_size or default_of(TrainConfig, "image_size"), a.pixel_mm, a.context_slices or 0
    from raysegment.model.weights import saved_config

    saved = saved_config(init)
    context = saved.model.context_slices if a.context_slices is None else a.context_slices
    if context < saved.model.context_slices:
        p.error(f"--init-weights is a 2.5-D model (context_slices {saved.model.context_slices}); "
                f"--context-slices {context} cannot load it")
    if fixed.setdefault("decoder_width", saved.model.decoder_width) != saved.model.decoder_width or "decoder_width" in ranges:
        p.error(f"--init-weights has decoder_width {saved.model.decoder_width}; --set/--range decoder_width "
                "cannot load it")
    return init, a.image_size or saved.image_size, a.pixel_mm if a.pixel_mm is not None else saved.pixel_mm, context


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    check_args(p, a)
    check_registry_answers(a.mlflow_uri)  # before hours of trials that log to it
    try:
        fixed = _parse_fixed(a.fixed)
        ranges = _parse_ranges(a.ranges, fixed)
    except ValueError as exc:
        p.error(str(exc))
    data = Path(a.data) if a.data else sample_shards(Path(a.storage) / "sample-shards")
    init, image_size, pixel_mm, context = _init_settings(p, a, fixed, ranges)
    base = TrainConfig(
        data=str(data.resolve()), model=ModelConfig(backbone=a.backbone, context_slices=context), loss=LossConfig(), epochs=a.epochs,
        augment=augment_from_args(a), precision=a.precision, pixel_mm=pixel_mm, val_every=a.val_every,
        batch_size=a.batch_size, image_size=image_size, crop_size=a.crop_size, seed=a.seed,
        max_steps_per_epoch=a.max_steps_per_epoch, weights=a.weights, init_weights=init,
        threads_per_worker=a.threads,
    )
    name = a.name or f"tune-{a.backbone}-{time.strftime('%Y%m%d-%H%M%S')}"
    spec = TuneSpec(base=base, run=RunSpec(num_workers=a.workers, use_gpu=a.gpus_per_worker > 0,
                                           gpus_per_worker=a.gpus_per_worker or 1.0,
                                           cpus_per_worker=a.cpus_per_worker, storage_path=a.storage, name=name,
                                           sharing=a.concurrency, verbose=a.verbose),
                    num_samples=a.num_samples, concurrency=a.concurrency, grace_period=a.grace_period, fixed=fixed, ranges=ranges,
                    tracking_uri=a.mlflow_uri, seed=a.seed, register=not a.no_register,
                    final_minutes=a.final_minutes, final_max_epochs=a.final_epochs)
    try:
        # before Ray starts: a resume asking for other settings than it began with is refused, a
        # finished search only prints what it found
        summary = finished_search(spec)
        if summary is not None:
            print(f"[raysegment] search {name} has finished: nothing to search (another --name starts a new one)")
        else:
            summary = run_until_interrupted(f"search {name}", storage.join(spec.run.storage_path, name),
                                            _start_and_search, a.address, spec)
    except SearchSpaceChanged as exc:
        p.error(str(exc))
    except Exception as exc:
        if not (why := disk_full(exc, storage.join(spec.run.storage_path, name))):
            raise
        print(_full_disk_line(spec, why), file=sys.stderr)
        return 1
    if isinstance(summary, int):
        return summary
    print(f"[raysegment] {len(summary['trials'])} trials (parent MLflow run {summary['parent_run_id']}):")
    for line in trial_lines(summary["trials"]):
        print(line)
    if "registered" in summary:
        reg = summary["registered"]
        print(f"[raysegment] registered {reg['name']} v{reg['version']}; champion: {reg['champion']} ({reg['reason']})")
    if "final" in summary:
        f = summary["final"]
        print(f"[raysegment] final model ({f['epochs']} epochs, from trial {f['trial_id']}): dice rv {f['dice_rv']:.3f} "
              f"myo {f['dice_myo']:.3f} lv {f['dice_lv']:.3f} mean {f['dice_mean']:.3f}")
        if "registered" in f:
            reg = f["registered"]
            print(f"[raysegment] registered final {reg['name']} v{reg['version']}; champion: {reg['champion']} "
                  f"({reg['reason']})")
    return 0


def _full_disk_line(spec: TuneSpec, why: str) -> str:
    """The line a search that met a full disk ends with, once the checkpoint folders its trials'
    runs could not finish are removed (they hold space; no resume reads them)."""
    from raysegment.training.resume import remove_unsaved_checkpoints

    where = storage.join(spec.run.storage_path, spec.run.name)
    runs = storage.join(where, "train")  # one Ray Train run per trial, and the final stage's
    removed = 0 if storage.is_uri(runs) else sum(remove_unsaved_checkpoints(runs, d.name)
                                                 for d in Path(runs).glob("*") if d.is_dir())
    return (f"error: search {spec.run.name} stopped: its storage {where} is full ({why}; {unfinished_removed(removed)}); "
            f"free space there and run the same command again")


TUNE_CONTROLLER = "ray.tune.execution.tune_controller"  # logs a trial's failure, with its exception


def _start_and_search(address: str | None, spec: TuneSpec) -> dict:
    import warnings

    # A resumed search's trial reports again the epoch it resumed after; Optuna keeps the first
    # report and said so on the console ("The reported value is ignored because this `step=1` is
    # already reported."), a line the user can do nothing about.
    warnings.filterwarnings("ignore", message="The reported value is ignored because this `step", category=UserWarning)
    ensure_ray(address, verbose=spec.run.verbose)
    with watch_cluster(lambda lost, why: _lost_line(spec, lost, why), loggers=(TUNE_CONTROLLER,)):
        return run_search(spec)


def _lost_line(spec: TuneSpec, lost, why: str) -> str:
    """The line of a search whose Ray went away (``cli.lost``): Tune waits for resources that do
    not come back, and Ray ended it a minute later with a C++ log line."""
    what, when = cluster_gone(lost, why)
    return f"error: search {spec.run.name} stopped: {what}; {when}the same command resumes it"


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: Ray pickles functions and classes
    # of __main__ by value (with every global they touch, e.g. torch.backends.cudnn, which cannot
    # be pickled), those of raysegment.training.tune by reference.
    from raysegment.cli.tune import main as _main

    sys.exit(_main())
