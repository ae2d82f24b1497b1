"""Ray Train (DDP) training of a U-Net on the Parquet shards.

    python -m raysegment.train --backbone mobilenet_v2 --data /tmp/shards --workers 1 --epochs 30

Each epoch streams the train split through Ray Data (every slice exactly once across the
workers), augments in torch, and validates on the whole val volumes (3-D Dice per class; every
``val_every``-th epoch and each of the last few, ``training.validation``). Every epoch reports
``dice_rv, dice_myo, dice_lv, dice_mean`` (and ``validated_epoch``) with a checkpoint holding model,
optimizer, epoch and the full ``TrainConfig``; a crashed worker restarts from it.

Imports ``training.core``, ``training.validation``, ``model``, ``data``, ``io``, ``config`` and
``runtime``; not ``service``, ``soak`` or ``cli``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from raysegment.config import TrainConfig, torch_threads
from raysegment.data.dataset import load_volumes, read_split
from raysegment.io import storage
from raysegment.model.checkpoint import MODEL_FILE, OPTIM_FILE, STATE_FILE, save_checkpoint
from raysegment.model.unet import build_model
from raysegment.runtime import clear_stale_scratch, quiet_progress_note, scratch_dir
from raysegment.training.core import autocast_dtype, epoch_seed, lr_scale_for, planned_epochs, run_steps
from raysegment.training.validation import epoch_dice, validate, validate_all

__all__ = ["RunHooks", "RunSpec", "TrainConfig", "make_trainer", "train", "validate"]
SCALER_FILE = "scaler.pt"
CKPT_SCRATCH = "raysegment-ckpt-"  # an epoch's checkpoint before Ray Train copies it to storage


def worker_threads(config: TrainConfig, processes_on_node: int, assigned_cpus: float | None = None) -> int:
    """Torch threads of a training worker, decided on the worker's own node (a driver on the head
    sees other cores): ``threads_per_worker``, else the CPUs Ray assigned it, or the node's cores
    (``available_cpus`` there) shared among the ``processes_on_node`` workers when that is more."""
    if assigned_cpus is None:
        import ray

        assigned_cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return torch_threads(config.threads_per_worker, processes_on_node, assigned_cpus)


# --------------------------------------------------------------------------- the per-worker loop


@dataclass
class _Run:
    """What a worker carries from epoch to epoch."""

    model: torch.nn.Module  # DDP-wrapped when there are several workers
    core: torch.nn.Module  # the bare U-Net
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype | None
    start_epoch: int = 0
    history: list = None
    elapsed_before: float = 0.0  # seconds of earlier attempts (a resumed run keeps its clock)


def _restore(config: TrainConfig, rank: int) -> _Run:
    """``restore_run`` inside a Ray Train worker: its device, ``prepare_model`` (DDP), its checkpoint."""
    import ray.train
    import ray.train.torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return restore_run(config, None, ray.train.torch.prepare_model, ray.train.torch.get_device(), rank)
    with checkpoint.as_directory() as d:
        return restore_run(config, Path(d), ray.train.torch.prepare_model, ray.train.torch.get_device(), rank)


def restore_run(config: TrainConfig, checkpoint_dir: Path | None, prepare, device: torch.device, rank: int = 0) -> _Run:
    """Build model, optimizer and scaler, from ``checkpoint_dir`` when given; ``prepare`` moves the
    model to ``device`` (and wraps it in DDP).

    Weights load before ``prepare``, optimizer and scaler state after it, so Adam's moments land
    on the parameters' device (loaded before, they would stay on the CPU and the first step after
    any resume on a GPU would fail).
    """
    model = build_model(config.model, weights=config.weights)
    if config.init_weights:
        from raysegment.model.weights import init_state_dict

        model.load_state_dict(init_state_dict(config.init_weights, config.model, aux_init=model.state_dict()))
    saved = None
    if checkpoint_dir is not None:
        d = checkpoint_dir
        model.load_state_dict(torch.load(d / MODEL_FILE, map_location="cpu", weights_only=True))
        saved = {"optimizer": torch.load(d / OPTIM_FILE, map_location="cpu", weights_only=True),
                 "scaler": torch.load(d / SCALER_FILE, weights_only=True) if (d / SCALER_FILE).exists() else None,
                 "state": json.loads((d / STATE_FILE).read_text())}
    model = prepare(model)
    core = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    dtype = autocast_dtype(config.precision, device)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and dtype == torch.float16)
    run = _Run(model, core, optimizer, scaler, device, dtype, history=[])
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])  # casts the moments to each parameter's device
        if saved["scaler"]:
            scaler.load_state_dict(saved["scaler"])
        state = saved["state"]
        run.start_epoch, run.history = state["epoch"] + 1, state.get("history", [])
        run.elapsed_before = state.get("metrics", {}).get("elapsed_s", 0.0)
        if rank == 0:
            print(resumed_line(state["epoch"] + 1), flush=True)
    return run


def resumed_line(epochs_done: int) -> str:
    """The line a resumed run prints (``bench gpu-smoke`` looks for it); epochs counted from 1, as
    the epoch lines count them."""
    return f"[raysegment] resumed after epoch {epochs_done} (its checkpoint)"


def _train_epoch(run: _Run, shard, config: TrainConfig, epoch: int, total_epochs: int, steps_est: int,
                 rank: int, world: int = 1, audit: bool = False) -> dict:
    """One pass over this worker's share of the train split → epoch metrics (and the slices seen)."""
    seed = epoch_seed(config, epoch, rank)
    gen = torch.Generator().manual_seed(seed)
    run.model.train()
    t0, seen, wait = time.perf_counter(), [], [0.0]
    batches = shard.iter_batches(batch_size=config.batch_size, batch_format="numpy",
                                 prefetch_batches=2 if run.device.type == "cuda" else 1,
                                 local_shuffle_buffer_size=max(config.shuffle_buffer_slices, config.batch_size),
                                 local_shuffle_seed=seed)

    def pairs():
        it = iter(batches)
        while True:
            t_wait = time.perf_counter()
            batch = next(it, None)
            wait[0] += time.perf_counter() - t_wait
            if batch is None:
                return
            if audit:
                seen.extend(f"{p}/{ph}/{int(s)}" for p, ph, s in zip(batch["patient"], batch["phase"], batch["slice"]))
            yield torch.from_numpy(batch["image"]), torch.from_numpy(batch["label"])

    # Workers may get unequal shares (every slice exactly once); join() keeps DDP from hanging.
    with run.model.join() if hasattr(run.model, "join") else contextlib.nullcontext():
        loss_sum, step = run_steps(run.model, run.optimizer, run.scaler, pairs(), config, epoch=epoch,
                                   total_epochs=total_epochs, steps_est=steps_est, generator=gen, device=run.device,
                                   dtype=run.dtype, lr_scale=lr_scale_for(config, world))
    return {"epoch": epoch, "loss": float(loss_sum) / step if step else float("nan"),
            "train_slices": len(seen) if audit else step * config.batch_size,
            "train_seconds": time.perf_counter() - t0, "data_wait_seconds": wait[0], "_seen": seen}


@dataclass(frozen=True)
class RunHooks:
    """Debug and fault-injection hooks of one run; they travel beside the ``TrainConfig`` to the
    workers, never inside it (so no checkpoint or registered model carries them)."""

    fail_at_epoch: int | None = None  # raise once at this epoch (the marker file makes it once)
    fail_marker: str | None = None
    audit_dir: str | None = None  # write per-rank audits (slices seen, node, weights checksum) here

    def maybe_fail(self, epoch: int, rank: int) -> None:
        if self.fail_at_epoch == epoch and self.fail_marker and not Path(self.fail_marker).exists():
            Path(self.fail_marker).write_text(f"rank {rank} failed at epoch {epoch}\n")
            raise RuntimeError(f"injected fault at epoch {epoch}")

    def audit(self, run: _Run, epoch: int, rank: int, seen: list[str]) -> None:
        import ray

        audit = {"rank": rank, "epoch": epoch, "seen": seen, "node_id": ray.get_runtime_context().get_node_id(),
                 "weights_sum": float(sum(p.double().sum() for p in run.core.parameters()))}
        Path(self.audit_dir, f"epoch{epoch}-rank{rank}.json").write_text(json.dumps(audit))


def _report(run: _Run, config: TrainConfig, metrics: dict, rank: int) -> None:
    """Rank 0 writes the checkpoint; every rank reports (Ray Train keeps metrics only with a checkpoint)."""
    import ray.train

    with scratch_dir(CKPT_SCRATCH) as tmp:
        ckpt = None
        if rank == 0:
            save_checkpoint(tmp, run.core, run.optimizer, config,
                            {"epoch": metrics["epoch"], "metrics": metrics, "history": run.history})
            if run.scaler.is_enabled():
                torch.save(run.scaler.state_dict(), tmp / SCALER_FILE)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def _of(metrics: dict, epoch: int) -> str:
    return "" if metrics["validated_epoch"] == epoch else f" (val of epoch {metrics['validated_epoch'] + 1})"


def _quiet_reports() -> None:
    """Ray Train logs one INFO line per reported epoch (the whole metrics dict and checkpoint path)
    under a logger named by its file; our epoch line says it shorter. Off unless --verbose."""
    import logging

    quiet_progress_note()
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # moved in another Ray release: the lines stay, nothing breaks
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _setup_worker(config: TrainConfig, loop_config: dict) -> tuple[int, int]:
    """This worker's logging, threads and seed; stale checkpoint staging removed → (rank, world size)."""
    import ray.data
    import ray.train

    if not loop_config.get("_verbose"):
        _quiet_reports()
    # A single worker runs its Ray Data iterator in-process; the epoch line is our progress report.
    ray.data.DataContext.get_current().enable_progress_bars = False
    ctx = ray.train.get_context()
    torch.set_num_threads(worker_threads(config, ctx.get_local_world_size() * int(loop_config.get("_sharing", 1))))
    torch.manual_seed(config.seed)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # fixed crop size: the fastest kernels, chosen once
    clear_stale_scratch(CKPT_SCRATCH)  # staging of a worker killed mid-write (Ctrl-C, a stopped trial)
    return ctx.get_world_rank(), ctx.get_world_size()


def train_loop_per_worker(loop_config: dict) -> None:
    """Restore, then per epoch: train, validate (rank 0), checkpoint and report."""
    import ray.train
    import torch.distributed as dist

    config = TrainConfig.from_dict(loop_config)
    hooks = RunHooks(**loop_config.get("_hooks", {}))
    rank, world = _setup_worker(config, loop_config)
    run = _restore(config, rank)
    # Every rank validates its share of the val volumes; the records are gathered, so no GPU
    # waits for rank 0 alone.
    volumes = load_volumes(config.data, "val", list(config.val_patients) if config.val_patients else None)[rank::world]
    shard = ray.train.get_dataset_shard("train")
    steps_est = max(1, math.ceil(int(loop_config.get("_n_train", 1000)) / world / config.batch_size))
    if config.max_steps_per_epoch:
        steps_est = min(steps_est, config.max_steps_per_epoch)

    t_start = time.perf_counter() - run.elapsed_before
    total_epochs = planned_epochs(config, run.start_epoch, run.elapsed_before)
    for epoch in range(run.start_epoch, config.epochs):
        if epoch >= total_epochs:
            break
        hooks.maybe_fail(epoch, rank)
        metrics = _train_epoch(run, shard, config, epoch, total_epochs, steps_est, rank, world, bool(hooks.audit_dir))
        seen = metrics.pop("_seen")
        if hooks.audit_dir:
            hooks.audit(run, epoch, rank, seen)
        dice, validated = epoch_dice(run, volumes, config, world, epoch, total_epochs)
        if rank == 0:
            metrics.update(dice, validated_epoch=validated)
            # Rank 0's clock decides, and the broadcast below gives every rank the same plan.
            metrics["elapsed_s"] = time.perf_counter() - t_start
            metrics["planned_epochs"] = planned_epochs(config, epoch + 1, metrics["elapsed_s"])
        if world > 1:
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = {**box[0], "loss": metrics["loss"]}
        if metrics["validated_epoch"] != epoch and epoch + 1 >= metrics["planned_epochs"]:
            # The budget ended the run sooner than planned: its last epoch (what ships) is validated too.
            metrics.update(validate_all(run, volumes, config, world), validated_epoch=epoch)
        run.history.append({k: metrics[k] for k in ("epoch", "loss", "dice_rv", "dice_myo", "dice_lv", "dice_mean",
                                                    "validated_epoch")})
        total_epochs = metrics["planned_epochs"]
        if rank == 0:
            budget = f", {metrics['elapsed_s'] / 60:.1f}/{config.time_budget_min:g} min" if config.time_budget_min else ""
            print(f"[raysegment] epoch {epoch + 1}/{total_epochs} loss {metrics['loss']:.4f} "
                  f"dice rv {metrics['dice_rv']:.3f} myo {metrics['dice_myo']:.3f} lv {metrics['dice_lv']:.3f} "
                  f"mean {metrics['dice_mean']:.3f}{_of(metrics, epoch)} ({metrics['train_seconds']:.0f}s train{budget})",
                  flush=True)
        _report(run, config, metrics, rank)


# --------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class RunSpec:
    """Where and how a training run executes (not part of the model's config)."""

    num_workers: int = 1
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # with use_gpu; a fraction (0.5) packs small trials onto one GPU
    cpus_per_worker: float = 1.0
    storage_path: str = "./runs"
    name: str | None = None
    max_failures: int = 2
    keep_checkpoints: int | None = 2  # best by val dice_mean; None keeps all
    cache_data: bool = True  # resample once into the object store instead of every epoch
    placement: str = "PACK"  # Ray placement-group strategy; STRICT_SPREAD puts each worker on its own node
    sharing: int = 1  # runs side by side on a node (Tune trials at once): they share its cores
    verbose: bool = False  # Ray Train's INFO lines (worker group, devices) on the console
    hooks: RunHooks = RunHooks()  # debug and fault injection (tests, --audit-dir)


class ExactlyOnceDataConfig:
    """Ray Train DataConfig whose split gives every row to exactly one worker (equal=False).

    ``equal=True`` (Ray's default) may drop up to world_size−1 rows per epoch so every worker gets
    as many: what fp16 training needs, where a worker that ran out early and ``join()``-ed would
    skip its GradScaler updates and optimizer steps, so scales and moments drift apart
    (pytorch#90057).
    """

    def __new__(cls, equal: bool = False):
        from ray.train import DataConfig

        class _Config(DataConfig):
            def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
                out = [{} for _ in range(world_size)]
                hints = worker_node_ids if self._enable_shard_locality else None
                for name, ds in datasets.items():
                    ds = ds.copy(ds)
                    ds.context.execution_options = self._resolve_execution_options(name)
                    if world_size == 1:
                        # One worker needs no split coordinator actor: on a small node its
                        # scheduling loop takes CPU from the training step (raysegment.cli.bench).
                        out[0][name] = ds.iterator()
                        continue
                    for i, split in enumerate(ds.streaming_split(world_size, equal=equal, locality_hints=hints)):
                        out[i][name] = split
                return out

        return _Config()


def make_trainer(config: TrainConfig, spec: RunSpec, train_loop=train_loop_per_worker, run_callbacks=()):
    """A ``TorchTrainer`` for ``config``; Ray must be initialised."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raysegment.data.prepare import load_manifest

    manifest = load_manifest(config.data)
    if not config.manifest_hash:
        config = replace(config, manifest_hash=manifest["content_hash"])
    loop_config = {**config.to_dict(), "_n_train": manifest["counts"]["slices"]["train"]}
    loop_config["_sharing"] = spec.sharing
    loop_config["_hooks"] = asdict(spec.hooks)
    loop_config["_verbose"] = spec.verbose
    resources = {"CPU": spec.cpus_per_worker}
    if spec.use_gpu:
        resources["GPU"] = spec.gpus_per_worker
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                               resources_per_worker=resources, placement_strategy=spec.placement),
        run_config=ray.train.RunConfig(
            name=spec.name,
            storage_path=storage.join(spec.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.keep_checkpoints,
                                                         checkpoint_score_attribute="dice_mean",
                                                         checkpoint_score_order="max"),
            callbacks=list(run_callbacks),
            logging_config=ray.train.LoggingConfig(log_level="INFO" if spec.verbose else "WARNING"),
        ),
        datasets={"train": _train_dataset(config, spec)},
        dataset_config=ExactlyOnceDataConfig(equal=needs_equal_shards(config, spec)),
    )


def needs_equal_shards(config: TrainConfig, spec: RunSpec) -> bool:
    """Several GPU workers that may train in fp16 (explicitly, or ``auto`` on a GPU without bf16,
    which the driver cannot see) get equal shards; elsewhere every slice goes to exactly one worker."""
    return spec.use_gpu and spec.num_workers > 1 and config.precision in ("auto", "fp16")


def _train_dataset(config: TrainConfig, spec: RunSpec):
    import ray.data

    if not spec.verbose:  # this process runs the first pass: in a search, each trial's actor
        quiet_progress_note()
    ds = read_split(config.data, "train", config.image_size, config.model.context_slices, config.pixel_mm)
    # Cached, the per-epoch pipeline is a block fetch; uncached, reading and resampling compete
    # with the training step for the same cores every epoch (measured with raysegment.cli.bench).
    if spec.cache_data:
        ds = ds.materialize()
    # Shards hold volumes in patient order; a new block order every epoch (reproducible from the
    # seed) plus the workers' shuffle buffers keep each batch from being one patient's slices.
    return ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=config.seed, reseed_after_execution=True))


def train(config: TrainConfig, spec: RunSpec):
    """Run training to the end (resuming a run of the same name) → ``ray.train.Result``."""
    return make_trainer(config, spec).fit()
