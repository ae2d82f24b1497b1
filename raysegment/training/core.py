"""The training core: one optimisation step (augmentation, autocast forward, loss, backward, step)
and the learning-rate schedule and time-budget plan every loop uses (the Ray Train loop, the
local loop, the benchmark). Imports data, model, config."""

from __future__ import annotations
import math
import torch
from raysegment.config import (Precision, TrainConfig)
from raysegment.data.dataset import apply_augment, sample_augment
from raysegment.model.losses import segmentation_loss
from raysegment.inference.predictor import AUTOCAST_DTYPES, resolve_precision


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a training step (None: fp32); ``auto`` as ``resolve_precision``."""
    return AUTOCAST_DTYPES[resolve_precision(precision, device)]


# --------------------------------------------------------------------------- one step, one validation


def train_step(model, optimizer, scaler, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
               generator: torch.Generator, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """One optimisation step on a batch of (N, [C,] S, S) images and (N, S, S) labels: sample and
    apply the augmentation, forward under autocast, loss, backward, step. Returns the loss (on
    the device; reading it syncs). ``raysegment.cli.bench`` times exactly this function."""
    params = sample_augment(labels, config.augment, config.crop_size, generator)
    if device.type == "cuda":  # pinned pages let the copies overlap the previous step's kernels
        images, labels = images.pin_memory(), labels.pin_memory()
    x, y = apply_augment(images.to(device, non_blocking=True), labels.to(device, non_blocking=True), params,
                         config.crop_size)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(x)
    loss = segmentation_loss(logits, y, config.loss)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def _lr_at(config: TrainConfig, epoch_progress: float, total_epochs: int | None = None) -> float:
    """Linear warm-up, then cosine decay to 1 % of ``lr`` at ``total_epochs`` (default ``epochs``);
    ``epoch_progress`` in epochs."""
    total = config.epochs if total_epochs is None else total_epochs
    if epoch_progress < config.warmup_epochs:
        return config.lr * max(epoch_progress / config.warmup_epochs, 0.01)
    t = (epoch_progress - config.warmup_epochs) / max(total - config.warmup_epochs, 1e-9)
    return config.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def lr_scale_for(config: TrainConfig, world: int) -> float:
    """Learning-rate factor for ``world`` data-parallel workers (their batches add up): ``lr`` is
    tuned for one worker's batch; sqrt scaling is the safe rule for Adam-type optimizers."""
    return {"none": 1.0, "sqrt": math.sqrt(world), "linear": float(world)}[config.lr_scaling]


def planned_epochs(config: TrainConfig, epochs_done: int, elapsed_s: float) -> int:
    """Epochs the run will do in all: ``epochs``, or with a time budget those that fit in it at
    the mean epoch time so far (at least the ones done)."""
    if config.time_budget_min is None or epochs_done == 0:
        return config.epochs
    left = config.time_budget_min * 60 - elapsed_s
    return max(epochs_done, min(config.epochs, epochs_done + int(left // (elapsed_s / epochs_done))))
