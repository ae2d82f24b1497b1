"""Ray Train (DDP) training of a U-Net on the Parquet shards.

    python -m raysegment.train --backbone mobilenet_v2 --data /tmp/shards --workers 1 --epochs 30

Each epoch streams the train split through Ray Data (every slice exactly once across the
workers), augments in torch, and validates on the whole val volumes (3-D Dice per class).
Every epoch reports ``dice_rv, dice_myo, dice_lv, dice_mean`` with a checkpoint holding model,
optimizer, epoch and the full ``TrainConfig``; a crashed worker restarts from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from raysegment import disable_telemetry
from raysegment.dataset import AugmentConfig, apply_augment, load_volumes, read_split, sample_augment
from raysegment.losses import LossConfig, segmentation_loss
from raysegment.metrics import dice_summary, score_records
from raysegment.models import ModelConfig, build_model, predict_volume

Precision = Literal["auto", "bf16", "fp32"]
DEFAULT_IMAGE_SIZE = 256  # pixels; 256 beat 224 in equal CPU time (README, Results)
DEFAULT_BATCH_SIZE = 8  # slices per worker step; MobileNetV2 from scratch: 8 beat 16 in equal CPU time (README)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; it travels (as JSON) with every checkpoint and registered model."""

    data: str
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    epochs: int = 20  # with time_budget_min: the most epochs
    # Wall minutes for training + validation; after each epoch the LR schedule is re-planned to
    # the number of epochs that fit, so the run ends annealed inside the budget.
    time_budget_min: float | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    image_size: int = DEFAULT_IMAGE_SIZE  # pixels, the square grid every slice is resampled to
    crop_size: int = 128  # pixels, the training crop (heart-centred with foreground_prob)
    precision: Precision = "auto"  # auto: bf16 autocast on CPU, fp16 AMP on GPU
    weights: Literal["imagenet"] | None = None  # encoder init
    init_weights: str | None = None  # .safetensors file or checkpoint folder to start from (fine-tuning)
    seed: int = 0
    threads_per_worker: int | None = None  # torch threads; None: the CPUs Ray gave the worker
    max_steps_per_epoch: int | None = None  # cap for smoke tests and benchmarks
    # Slices held in each worker's shuffle buffer (on top of a per-epoch random block order):
    # shards are stored volume by volume, and batches from one volume train far worse.
    shuffle_buffer_slices: int = 256
    val_patients: tuple[str, ...] | None = None  # None: every val patient
    manifest_hash: str = ""
    # Test hooks: raise once at this epoch (marker file makes it once), write per-rank audits.
    fail_at_epoch: int | None = None
    fail_marker: str | None = None
    audit_dir: str | None = None

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        if isinstance(d.get("model"), dict) and "context_slices" not in d["model"]:
            d["model"] = {**d["model"], "context_slices": 0}  # saved before 2.5-D input existed: 2-D
        nested = {"model": ModelConfig, "loss": LossConfig, "augment": AugmentConfig}
        for key, typ in nested.items():
            if key in d and isinstance(d[key], dict):
                d[key] = _from_plain(typ, d[key])
        if d.get("val_patients") is not None:
            d["val_patients"] = tuple(d["val_patients"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _from_plain(typ, d: dict):
    # JSON turns tuples into lists; frozen configs want tuples back.
    return typ(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def check_flip_tta(config: TrainConfig) -> None:
    """Flip test-time augmentation averages in the mirrored image's prediction; a model trained
    without flips has never seen a mirrored heart, so refuse it."""
    if config.augment.flip_prob == 0:
        raise ValueError("flip TTA needs a model trained with left-right flips; this one was trained with "
                         "augment.flip_prob=0 (train with --flip-prob 0.5 to use --flip-tta)")


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.bfloat16


# --------------------------------------------------------------------------- checkpoints

MODEL_FILE, OPTIM_FILE, CONFIG_FILE, STATE_FILE = "model.pt", "optimizer.pt", "config.json", "state.json"


def save_checkpoint(folder: Path, model, optimizer, config: TrainConfig, state: dict) -> None:
    torch.save(model.state_dict(), folder / MODEL_FILE)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), folder / OPTIM_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))


def load_checkpoint_model(folder: str | Path, device: str = "cpu"):
    """Rebuild the model of a checkpoint folder from its own config → (model, config, state)."""
    folder = Path(folder)
    config = TrainConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
    model = build_model(config.model)
    model.load_state_dict(torch.load(folder / MODEL_FILE, map_location=device, weights_only=True))
    from raysegment.weights import saved_state

    return model.to(device).eval(), config, saved_state(folder)


# --------------------------------------------------------------------------- validation


def validate(model, volumes, config: TrainConfig, device) -> tuple[dict, list[dict]]:
    """3-D per-volume Dice on whole val volumes → (summary, per-volume records)."""
    records = []
    dtype = autocast_dtype(config.precision, device)
    for v in volumes:
        pred = predict_volume(model, v.image, config.image_size, device=device, autocast_dtype=dtype)
        records += score_records(pred, v.label, v.spacing, distances=False, patient=v.patient, phase=v.phase)
    return dice_summary(records), records


# --------------------------------------------------------------------------- the per-worker loop


def _lr_at(config: TrainConfig, epoch_progress: float, total_epochs: int | None = None) -> float:
    """Linear warm-up, then cosine decay to 1 % of ``lr`` at ``total_epochs`` (default ``epochs``);
    ``epoch_progress`` in epochs."""
    total = config.epochs if total_epochs is None else total_epochs
    if epoch_progress < config.warmup_epochs:
        return config.lr * max(epoch_progress / config.warmup_epochs, 0.01)
    t = (epoch_progress - config.warmup_epochs) / max(total - config.warmup_epochs, 1e-9)
    return config.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def planned_epochs(config: TrainConfig, epochs_done: int, elapsed_s: float) -> int:
    """Epochs the run will do in all: ``epochs``, or with a time budget those that fit in it at
    the mean epoch time so far (at least the ones done)."""
    if config.time_budget_min is None or epochs_done == 0:
        return config.epochs
    left = config.time_budget_min * 60 - elapsed_s
    return max(epochs_done, min(config.epochs, epochs_done + int(left // (elapsed_s / epochs_done))))


def train_loop_per_worker(loop_config: dict) -> None:
    import ray
    import ray.data
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    config = TrainConfig.from_dict(loop_config)
    # A single worker runs its Ray Data iterator in-process; the epoch line is our progress report.
    ray.data.DataContext.get_current().enable_progress_bars = False
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.threads_per_worker:
        torch.set_num_threads(config.threads_per_worker)
    torch.manual_seed(config.seed)
    device = ray.train.torch.get_device()

    model = build_model(config.model, weights=config.weights)
    if config.init_weights:
        from raysegment.weights import init_state_dict

        model.load_state_dict(init_state_dict(config.init_weights, config.model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start_epoch, history, elapsed_before = 0, [], 0.0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model.load_state_dict(torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True))
            optimizer.load_state_dict(torch.load(Path(d) / OPTIM_FILE, map_location="cpu", weights_only=True))
            state = json.loads((Path(d) / STATE_FILE).read_text())
        start_epoch, history = state["epoch"] + 1, state.get("history", [])
        elapsed_before = state.get("metrics", {}).get("elapsed_s", 0.0)
        if rank == 0:
            print(f"[raysegment] resumed from checkpoint at epoch {state['epoch']}", flush=True)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    dtype = autocast_dtype(config.precision, device)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and dtype == torch.float16)

    volumes = load_volumes(config.data, "val", list(config.val_patients) if config.val_patients else None) if rank == 0 else []
    shard = ray.train.get_dataset_shard("train")
    n_train = int(loop_config.get("_n_train", 1000))
    steps_est = max(1, math.ceil(n_train / world / config.batch_size))
    if config.max_steps_per_epoch:
        steps_est = min(steps_est, config.max_steps_per_epoch)

    t_start = time.perf_counter() - elapsed_before  # a resumed run keeps its clock (time budget)
    total_epochs = planned_epochs(config, start_epoch, elapsed_before)
    for epoch in range(start_epoch, config.epochs):
        if epoch >= total_epochs:
            break
        if config.fail_at_epoch == epoch and config.fail_marker and not Path(config.fail_marker).exists():
            Path(config.fail_marker).write_text(f"rank {rank} failed at epoch {epoch}\n")
            raise RuntimeError(f"injected fault at epoch {epoch}")
        # One seed per (run seed, epoch, rank) drives both the shuffle buffer and the augmentation.
        epoch_seed = config.seed * 100_003 + epoch * 101 + rank
        gen = torch.Generator().manual_seed(epoch_seed)
        model.train()
        t0, seen, losses, step = time.perf_counter(), [], [], 0
        batches = shard.iter_batches(batch_size=config.batch_size, batch_format="numpy",
                                     local_shuffle_buffer_size=max(config.shuffle_buffer_slices, config.batch_size),
                                     local_shuffle_seed=epoch_seed)
        # Workers may get unequal shares (every slice exactly once); join() keeps DDP from hanging.
        join = model.join() if hasattr(model, "join") else _nullcontext()
        data_wait, batch_iter = 0.0, iter(batches)
        with join:
            while True:
                t_wait = time.perf_counter()
                batch = next(batch_iter, None)
                data_wait += time.perf_counter() - t_wait
                if batch is None or (config.max_steps_per_epoch and step >= config.max_steps_per_epoch):
                    break
                if config.audit_dir:
                    seen += [f"{p}/{ph}/{int(s)}" for p, ph, s in zip(batch["patient"], batch["phase"], batch["slice"])]
                for g in optimizer.param_groups:
                    g["lr"] = _lr_at(config, epoch + min(step / steps_est, 1.0), total_epochs)
                images, labels = torch.from_numpy(batch["image"]), torch.from_numpy(batch["label"])
                params = sample_augment(labels, config.augment, config.crop_size, gen)
                x, y = apply_augment(images.to(device), labels.to(device), params, config.crop_size)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    logits = model(x)
                loss = segmentation_loss(logits, y, config.loss)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                losses.append(float(loss.detach()))
                step += 1
        train_time = time.perf_counter() - t0

        if config.audit_dir:
            audit = {"rank": rank, "epoch": epoch, "seen": seen, "node_id": ray.get_runtime_context().get_node_id(),
                     "weights_sum": float(sum(p.double().sum() for p in core.parameters()))}
            Path(config.audit_dir, f"epoch{epoch}-rank{rank}.json").write_text(json.dumps(audit))

        metrics = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
                   "train_slices": len(seen) if config.audit_dir else step * config.batch_size,
                   "train_seconds": train_time, "data_wait_seconds": data_wait}
        if rank == 0:
            val, _ = validate(core, volumes, config, device)
            metrics.update(val)
            # Rank 0's clock decides, and the broadcast below gives every rank the same plan.
            metrics["elapsed_s"] = time.perf_counter() - t_start
            metrics["planned_epochs"] = planned_epochs(config, epoch + 1, metrics["elapsed_s"])
        if world > 1:
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = {**box[0], "loss": metrics["loss"]}
        history.append({k: metrics[k] for k in ("epoch", "loss", "dice_rv", "dice_myo", "dice_lv", "dice_mean")})
        total_epochs = metrics["planned_epochs"]
        if rank == 0:
            budget = f", {metrics['elapsed_s'] / 60:.1f}/{config.time_budget_min:g} min" if config.time_budget_min else ""
            print(f"[raysegment] epoch {epoch + 1}/{total_epochs} loss {metrics['loss']:.4f} "
                  f"dice rv {metrics['dice_rv']:.3f} myo {metrics['dice_myo']:.3f} lv {metrics['dice_lv']:.3f} "
                  f"mean {metrics['dice_mean']:.3f} ({train_time:.0f}s train{budget})", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(Path(tmp), core, optimizer, config, {"epoch": epoch, "metrics": metrics, "history": history})
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class RunSpec:
    """Where and how a training run executes (not part of the model's config)."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str = "./runs"
    name: str | None = None
    max_failures: int = 2
    keep_checkpoints: int | None = 2  # best by val dice_mean; None keeps all
    cache_data: bool = True  # resample once into the object store instead of every epoch
    placement: str = "PACK"  # Ray placement-group strategy; STRICT_SPREAD puts each worker on its own node


class ExactlyOnceDataConfig:
    """Ray Train DataConfig whose split gives every row to exactly one worker (equal=False).

    The default (equal=True) may drop up to world_size−1 rows per epoch to even out shards.
    """

    def __new__(cls):
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
                        # scheduling loop takes CPU from the training step (raysegment.bench).
                        out[0][name] = ds.iterator()
                        continue
                    for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                        out[i][name] = split
                return out

        return _Config()


def make_trainer(config: TrainConfig, spec: RunSpec, train_loop=train_loop_per_worker, run_callbacks=()):
    """A ``TorchTrainer`` for ``config``; Ray must be initialised."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raysegment.prepare import load_manifest

    manifest = load_manifest(config.data)
    if not config.manifest_hash:
        config = replace(config, manifest_hash=manifest["content_hash"])
    loop_config = {**config.to_dict(), "_n_train": manifest["counts"]["slices"]["train"]}
    if config.threads_per_worker is None:
        loop_config["threads_per_worker"] = max(1, int(round(spec.cpus_per_worker)))
    resources = {"CPU": spec.cpus_per_worker}
    if spec.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                               resources_per_worker=resources, placement_strategy=spec.placement),
        run_config=ray.train.RunConfig(
            name=spec.name,
            storage_path=str(Path(spec.storage_path).resolve()) if "://" not in spec.storage_path else spec.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.keep_checkpoints,
                                                         checkpoint_score_attribute="dice_mean",
                                                         checkpoint_score_order="max"),
            callbacks=list(run_callbacks),
        ),
        datasets={"train": _train_dataset(config, spec)},
        dataset_config=ExactlyOnceDataConfig(),
    )


def _train_dataset(config: TrainConfig, spec: RunSpec):
    import ray.data

    ds = read_split(config.data, "train", config.image_size, config.model.context_slices)
    # Cached, the per-epoch pipeline is a block fetch; uncached, reading and resampling compete
    # with the training step for the same cores every epoch (measured with raysegment.bench).
    if spec.cache_data:
        ds = ds.materialize()
    # Shards hold volumes in patient order; a new block order every epoch (reproducible from the
    # seed) plus the workers' shuffle buffers keep each batch from being one patient's slices.
    return ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=config.seed, reseed_after_execution=True))


def resolve_init_weights(value: str | None, backbone: str) -> str | None:
    """CLI value → absolute path ('shipped' → the weights bundled with raysegment for ``backbone``)."""
    if not value:
        return None
    if value == "shipped":
        from raysegment.weights import shipped_weights

        return str(shipped_weights(backbone))
    path = Path(value).resolve()
    if not path.exists():
        raise SystemExit(f"error: --init-weights {value}: no such file or folder")
    return str(path)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or RAY_ADDRESS / a running cluster), else start a local Ray."""
    import ray

    disable_telemetry()
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        # The dashboard (bound to 127.0.0.1) also serves the state API that Ray Train polls.
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True)
    import ray.data

    # Our per-epoch line is the progress report; Ray Data's per-operator bars flood job logs.
    ray.data.DataContext.get_current().enable_progress_bars = False


def train(config: TrainConfig, spec: RunSpec):
    """Run training to the end (resuming a run of the same name) → ``ray.train.Result``."""
    return make_trainer(config, spec).fit()


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m raysegment.train`` command line (also used to dry-run job specs)."""
    p = argparse.ArgumentParser(prog="python -m raysegment.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="mobilenet_v2", choices=["densenet121", "mobilenet_v2"])
    p.add_argument("--data", required=True, help="shards folder from raysegment.prepare")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--epochs", type=int, default=20, help="epochs (with --minutes: the most epochs)")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-time budget for training + validation; the LR schedule is fitted to the epochs that fit")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, AMP")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--decoder-width", type=int, default=32)
    p.add_argument("--context-slices", type=int, default=0, choices=[0, 1],
                   help="neighbouring slices per side as extra input channels (1 = 2.5-D: slices k-1, k, k+1)")
    p.add_argument("--ce-weight", type=float, default=1.0)
    p.add_argument("--dice-weight", type=float, default=1.0)
    p.add_argument("--class-weights", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("RV", "MYO", "LV"))
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    p.add_argument("--crop-size", type=int, default=128)
    p.add_argument("--flip-prob", type=float, default=AugmentConfig.flip_prob,
                   help="probability of a left-right flip in augmentation (0: keep the scanner's orientation)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--weights", default=None, choices=["imagenet"], help="encoder init (default: random)")
    p.add_argument("--init-weights", default=None, metavar="FILE|shipped",
                   help="start from a .safetensors file or checkpoint folder ('shipped': the bundled weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", default="./runs", help="shared storage path for checkpoints (local dir or URI)")
    p.add_argument("--name", default=None, help="run name; re-running the same name resumes it")
    p.add_argument("--max-failures", type=int, default=2)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: this machine's cores / workers)")
    p.add_argument("--placement", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                   help="how workers are placed on nodes (STRICT_SPREAD: one worker per node)")
    p.add_argument("--audit-dir", default=None,
                   help="debug: write, per epoch and rank, the slices seen, the node and a weights checksum (JSON)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a new local Ray)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    config = TrainConfig(
        data=str(Path(a.data).resolve()),
        model=ModelConfig(backbone=a.backbone, decoder_width=a.decoder_width, context_slices=a.context_slices),
        loss=LossConfig(ce_weight=a.ce_weight, dice_weight=a.dice_weight, class_weights=tuple(a.class_weights)),
        augment=AugmentConfig(flip_prob=a.flip_prob),
        epochs=a.epochs, time_budget_min=a.minutes, batch_size=a.batch_size, lr=a.lr, image_size=a.image_size, crop_size=a.crop_size,
        precision=a.precision, weights=a.weights, seed=a.seed, init_weights=resolve_init_weights(a.init_weights, a.backbone),
        threads_per_worker=a.threads or max(1, (os.cpu_count() or 1) // a.workers),
        audit_dir=str(Path(a.audit_dir).resolve()) if a.audit_dir else None,
    )
    spec = RunSpec(num_workers=a.workers, use_gpu=a.gpu, cpus_per_worker=a.cpus_per_worker, storage_path=a.storage,
                   name=a.name or f"train-{a.backbone}-{time.strftime('%Y%m%d-%H%M%S')}", max_failures=a.max_failures,
                   placement=a.placement)
    ensure_ray(a.address)
    result = train(config, spec)
    if result.error:
        print(f"error: training failed: {result.error}", file=sys.stderr)
        return 1
    m = result.metrics
    print(f"done: {spec.name} epochs {m['epoch'] + 1} val dice rv {m['dice_rv']:.3f} myo {m['dice_myo']:.3f} "
          f"lv {m['dice_lv']:.3f} mean {m['dice_mean']:.3f}; checkpoint {result.checkpoint.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
