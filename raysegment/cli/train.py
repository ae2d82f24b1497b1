"""``python -m raysegment.train``: the command line of one Ray Train run, a thin layer over
``raysegment.training.train``. Top layer: may import every stage."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from raysegment.cli import INTERRUPTED, command_parser
from raysegment.cli.args import (
    _td,
    add_run_arguments,
    augment_from_args,
    check_args,
    disk_full,
    resolve_init_weights,
    run_until_interrupted,
    unfinished_removed,
)
from raysegment.cli.lost import cluster_gone, exit_now, lost_cluster, watch_cluster
from raysegment.cli.recipe import apply_recipe, recipe_line, with_recipe
from raysegment.config import LossConfig, ModelConfig, TrainConfig, default_of
from raysegment.io import storage
from raysegment.runtime import ensure_ray
from raysegment.training.resume import run_changes
from raysegment.training.train import RunHooks, RunSpec, train


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m raysegment.train`` command line (also used to dry-run job specs)."""
    p = command_parser(
        "train",
        "Train one U-Net (DenseNet-121 or MobileNetV2 encoder) on prepared shards with Ray Train, DDP over "
        "--workers. --minutes fits the cosine schedule to a wall-time budget; the same --storage/--name "
        "resumes a stopped run with its clock. The run's last epoch is what it leaves "
        "(python -m raysegment.weights export turns it into a weights file).",
        "python -m raysegment.train --backbone mobilenet_v2 --data /data/shards --minutes 60 --storage ~/runs --name mnv2",
        "python -m raysegment.train --local cuda --data BUNDLE.npz --epochs 100 --storage ~/runs --name mnv2-gpu")
    add_run_arguments(p)
    p.add_argument("--data", required=True, help="shards folder from raysegment.data.prepare (with --local also "
                                                 "a `diagnosis pack` bundle, .npz)")
    p.add_argument("--local", metavar="DEVICE", default=None,
                   help="train in this process without Ray on DEVICE (cpu, cuda), for a machine with torch but no "
                        "Ray: no validation or checkpoints during the run; the last epoch is scored on val and written "
                        "to STORAGE/NAME.safetensors")
    p.add_argument("--epochs", type=int, default=_td("epochs"), help="epochs (with --minutes: the most epochs)")
    p.add_argument("--minutes", type=float, default=_td("time_budget_min"),
                   help="wall-time budget for training + validation; the LR schedule is fitted to the epochs that fit")
    p.add_argument("--gpu", action="store_const", const=1.0, dest="gpus_per_worker", default=0.0, help="one GPU per worker")
    p.add_argument("--gpus-per-worker", type=float, dest="gpus_per_worker",
                   help="GPU share per worker (0.5: two workers or trials on one GPU)")
    p.add_argument("--lr", type=float, default=_td("lr"), help="peak learning rate (AdamW, cosine schedule)")
    p.add_argument("--decoder-width", type=int, default=default_of(ModelConfig, "decoder_width"),
                   help="channels of the decoder at stride 2 (×2 per level down)")
    p.add_argument("--context-slices", type=int, default=default_of(ModelConfig, "context_slices"), choices=[0, 1],
                   help="neighbouring slices per side as extra input channels (1 = 2.5-D: slices k-1, k, k+1)")
    p.add_argument("--deep-supervision", type=int, default=default_of(ModelConfig, "deep_supervision"), choices=[0, 1, 2, 3],
                   help="decoder levels at strides 2, 4, 8 that also get a head and a loss term in training (0: off)")
    loss = LossConfig()
    p.add_argument("--ce-weight", type=float, default=loss.ce_weight, help="weight of the cross-entropy term of the loss")
    p.add_argument("--dice-weight", type=float, default=loss.dice_weight, help="weight of the soft-Dice term of the loss")
    p.add_argument("--class-weights", type=float, nargs=3, default=loss.class_weights, metavar=("RV", "MYO", "LV"),
                   help="per-class weights in both loss terms")
    p.add_argument("--image-size", type=int, default=_td("image_size"), help="square network grid, pixels")
    p.add_argument("--max-failures", type=int, default=default_of(RunSpec, "max_failures"),
                   help="restarts from the last checkpoint after a worker or its node dies")
    p.add_argument("--placement", default=default_of(RunSpec, "placement"),
                   choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                   help="how workers are placed on nodes (STRICT_SPREAD: one worker per node)")
    p.add_argument("--recipe", metavar="MODEL", default=None,
                   help="train again with the recipe MODEL carries (shipped:BACKBONE, a weights file, a checkpoint or "
                        "run folder, models:/…): its options become the defaults, those given here win; not its weights")
    p.add_argument("--mlflow-uri", default=None, help="tracking server of the registry, for a models:/ --recipe")
    p.add_argument("--audit-dir", default=None,
                   help="debug: write, per epoch and rank, the slices seen, the node and a weights checksum (JSON)")
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    """The run's TrainConfig from the parsed options (each recipe option: ``cli.recipe.OPTION_FIELDS``)."""
    return TrainConfig(
        data=str(Path(a.data).resolve()),
        model=ModelConfig(backbone=a.backbone, decoder_width=a.decoder_width, context_slices=a.context_slices,
                          deep_supervision=a.deep_supervision),
        loss=LossConfig(ce_weight=a.ce_weight, dice_weight=a.dice_weight, class_weights=tuple(a.class_weights)),
        augment=augment_from_args(a),
        epochs=a.epochs, time_budget_min=a.minutes, batch_size=a.batch_size, lr=a.lr, image_size=a.image_size, crop_size=a.crop_size,
        pixel_mm=a.pixel_mm, val_every=a.val_every, max_steps_per_epoch=a.max_steps_per_epoch,
        precision=a.precision, weights=a.weights, seed=a.seed, init_weights=resolve_init_weights(a.init_weights, a.backbone),
        threads_per_worker=a.threads,
    )


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a, recipe = apply_recipe(p, argv, p.parse_args(argv))
    check_args(p, a)
    config = config_from_args(a)
    if recipe is not None:
        config = with_recipe(config, recipe)
        print(recipe_line(a.recipe, recipe, config), flush=True)
    if a.local:
        return _train_local(p, a, config)
    hooks = RunHooks(audit_dir=str(Path(a.audit_dir).resolve()) if a.audit_dir else None)
    spec = RunSpec(num_workers=a.workers, use_gpu=a.gpus_per_worker > 0, gpus_per_worker=a.gpus_per_worker or 1.0,
                   cpus_per_worker=a.cpus_per_worker, storage_path=a.storage,
                   name=a.name or f"train-{a.backbone}-{time.strftime('%Y%m%d-%H%M%S')}", max_failures=a.max_failures,
                   placement=a.placement, verbose=a.verbose, hooks=hooks)
    _check_resume(p, config, spec)
    if finished := _finished(config, spec):
        metrics, checkpoint = finished
        print(f"[raysegment] run {spec.name} has done its {metrics['epoch'] + 1} planned epochs: nothing to train "
              f"(a larger --epochs or --minutes goes on with it)")
        print(done_line(spec.name, metrics["epoch"] + 1, metrics, f"checkpoint {checkpoint}"))
        return 0
    try:
        result = run_until_interrupted(f"run {spec.name}", storage.join(spec.storage_path, spec.name),
                                       _start_and_train, a, config, spec)
    except Exception as exc:
        if gone := lost_cluster(exc):
            exit_now(_lost_line(spec, *gone))
        if (line := failed_line(spec, exc)) is None:
            raise
        print(line, file=sys.stderr, flush=True)
        return 1
    if isinstance(result, int):
        return result
    m = result.metrics
    print(done_line(spec.name, m["epoch"] + 1, m, f"checkpoint {result.checkpoint.path}"))
    return 0


def _check_resume(p: argparse.ArgumentParser, config: TrainConfig, spec: RunSpec) -> None:
    """A run re-run under its name resumes with the settings it began with: other ones (but where
    the shards lie, the threads and how long it goes on) are refused before Ray starts."""
    if changed := run_changes(config, spec.storage_path, spec.name):
        p.error(f"run {spec.name} began with other settings ({'; '.join(changed)}): re-run it as it began, or give "
                f"a new --name (with --init-weights CHECKPOINT_FOLDER of this run, it starts from those weights)")


def _finished(config: TrainConfig, spec: RunSpec) -> tuple[dict, str] | None:
    """(the metrics, the checkpoint) of run ``spec.name`` when ``config`` plans no epoch beyond those it
    has done, decided as the resumed run would decide it: a re-run then needs no Ray (it took ~35 s
    to start one and find that out)."""
    from raysegment.training.core import planned_epochs
    from raysegment.training.resume import latest_checkpoint

    latest = latest_checkpoint(spec.storage_path, spec.name)
    if latest is None or not all(k in latest[1] for k in ("epoch", "elapsed_s", "dice_mean")):
        return None
    folder, metrics = latest
    done = metrics["epoch"] + 1
    return (metrics, folder) if planned_epochs(config, done, metrics["elapsed_s"]) <= done else None


def done_line(name: str, epochs: int, dice: dict, where: str) -> str:
    """The line a finished run ends with, Ray or ``--local`` (scripts read its ``mean X;``);
    ``where``: what it left, e.g. ``checkpoint PATH``."""
    return (f"done: {name} epochs {epochs} val dice rv {dice['dice_rv']:.3f} myo {dice['dice_myo']:.3f} "
            f"lv {dice['dice_lv']:.3f} mean {dice['dice_mean']:.3f}; {where}")


def _train_local(p: argparse.ArgumentParser, a: argparse.Namespace, config: TrainConfig) -> int:
    """``--local``: the run in this process, without Ray (``training.local.train_local``)."""
    from raysegment.training.local import train_local

    if a.workers != 1 or a.address or a.audit_dir or a.gpus_per_worker:
        p.error("--local trains in this process on the device it names: no --workers above 1, --address, --gpu or --audit-dir")
    if storage.is_uri(a.storage):
        p.error(f"--storage {a.storage}: --local writes a local file; give a folder")
    name = a.name or f"train-{a.backbone}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(a.storage).expanduser() / f"{name}.safetensors"
    if out.exists():
        p.error(f"{out} exists: a --local run does not resume; give another --name")
    last = [0.0]

    def log(line: str) -> None:  # one epoch line per 30 s: a GPU does hundreds of epochs in minutes
        if time.monotonic() - last[0] >= 30:
            print(line, flush=True)
            last[0] = time.monotonic()

    try:
        history = train_local(config, a.local, out, log=log)
    except KeyboardInterrupt:
        print(f"interrupted: {name} not written (a --local run does not resume)", file=sys.stderr)
        return INTERRUPTED
    print(done_line(name, len(history), history[-1], f"weights {out}"))
    return 0


def failed_line(spec: RunSpec, exc: BaseException) -> str | None:
    """The one line a Ray Train run that failed for good in its workers ends with, after their
    tracebacks (Ray streams them above it); None for another error (its traceback). On a full disk
    the checkpoint folders whose upload failed part-way are removed first: they hold space."""
    from raysegment.training.resume import latest_checkpoint, remove_unsaved_checkpoints

    failures = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError
    if not failures:
        return None
    where = storage.join(spec.storage_path, spec.name)
    latest = latest_checkpoint(spec.storage_path, spec.name)
    kept = _kept(latest)
    if why := disk_full(exc, where):
        removed = remove_unsaved_checkpoints(spec.storage_path, spec.name)
        return (f"error: run {spec.name} stopped: its storage {where} is full ({why}; {kept}; {unfinished_removed(removed)}); "
                f"free space there and the same command {'resumes' if latest else 'starts'} it")
    first = failures[min(failures)]
    why = (str(first).strip().splitlines() or [type(first).__name__])[-1][:300]
    return (f"error: run {spec.name} failed in its workers after {spec.max_failures} restarts ({why}; their tracebacks "
            f"are above); {kept}")


def _kept(latest) -> str:
    return f"epoch {latest[1]['epoch'] + 1} is its last saved one" if latest else "it has no saved epoch"


def _lost_line(spec: RunSpec, lost, why: str) -> str:
    """The line of a run whose Ray went away (``cli.lost``)."""
    from raysegment.training.resume import latest_checkpoint

    latest = latest_checkpoint(spec.storage_path, spec.name)
    what, when = cluster_gone(lost, why)
    return (f"error: run {spec.name} stopped: {what}; {_kept(latest)}; {when}the same command "
            f"{'resumes' if latest else 'starts'} it")


def _start_and_train(a: argparse.Namespace, config: TrainConfig, spec: RunSpec):
    ensure_ray(a.address, verbose=a.verbose)
    with watch_cluster(lambda lost, why: _lost_line(spec, lost, why)):
        return train(config, spec)


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: Ray pickles functions and classes
    # of __main__ by value (with every global they touch, e.g. torch.backends.cudnn, which cannot
    # be pickled), those of raysegment.training.train by reference.
    from raysegment.cli.train import main as _main

    sys.exit(_main())
