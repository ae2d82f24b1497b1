"""The training core: one optimisation step (augmentation, autocast forward, loss, backward, step)
and the learning-rate schedule and time-budget plan every loop uses (the Ray Train loop, the
local loop, the benchmark). Imports data, model, config."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from raysegment.config import Precision, TrainConfig
from raysegment.data.dataset import apply_augment, sample_augment
from raysegment.inference.predictor import AUTOCAST_DTYPES, resolve_precision
from raysegment.model.losses import deep_supervision_loss


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a training step (None: fp32); ``auto`` as ``resolve_precision``."""
    return AUTOCAST_DTYPES[resolve_precision(precision, device)]


# --------------------------------------------------------------------------- one step, one epoch


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
        levels = model(x, aux=True)  # the full-resolution logits, then any deep-supervision heads'
    loss = deep_supervision_loss(levels, y, config.loss)  # with one level: segmentation_loss, exactly
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


VAL_LAST = 3  # the last planned epochs are always validated (the schedule may end any of them)


def validation_due(config: TrainConfig, epoch: int, total_epochs: int, validated_before: bool) -> bool:
    """Whether ``epoch`` (0-based) is validated: every ``val_every``-th, each of the last ``VAL_LAST``
    of ``total_epochs`` planned, and any epoch with no validation before it in the run."""
    return (config.val_every <= 1 or not validated_before or (epoch + 1) % config.val_every == 0
            or epoch + 1 > total_epochs - VAL_LAST)


def epoch_seed(config: TrainConfig, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch on one worker: it drives that epoch's shuffle and augmentation."""
    return config.seed * 100_003 + epoch * 101 + rank


def run_steps(model, optimizer, scaler, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], config: TrainConfig, *,
              epoch: int, total_epochs: int, steps_est: int, generator: torch.Generator, device: torch.device,
              dtype: torch.dtype | None, lr_scale: float = 1.0) -> tuple[torch.Tensor, int]:
    """One epoch of steps over ``batches`` ((images, labels) pairs), the one loop every trainer runs
    (the Ray Train workers, the local loop, the benchmark): per step the scheduled learning rate
    (× ``lr_scale``), then ``train_step``; at most ``config.max_steps_per_epoch`` steps.

    Returns (the summed loss, on the device: reading it every step would sync a GPU, the steps)."""
    loss_sum, step = torch.zeros((), device=device), 0
    for images, labels in batches:
        if config.max_steps_per_epoch and step >= config.max_steps_per_epoch:
            break
        for g in optimizer.param_groups:
            g["lr"] = _lr_at(config, epoch + min(step / steps_est, 1.0), total_epochs) * lr_scale
        loss_sum += train_step(model, optimizer, scaler, images, labels, config, generator, device, dtype)
        step += 1
    return loss_sum, step
