"""The local training loop: the training core on in-memory volumes in this process, without Ray
(the cross-validation folds of the diagnosis, many small runs on one GPU, ``train --local`` on a
machine with torch but no Ray). Training layer: imports data, model, inference, analysis."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from raysegment.config import TrainConfig
from raysegment.training.core import epoch_seed, planned_epochs, run_steps
from raysegment.training.train import restore_run


def slice_tensors(volumes, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slice of ``volumes`` on the training grid: images (N, S, S) or (N, 3, S, S) with
    context, labels (N, S, S) uint8 — what the Ray pipeline's ``resize_batch`` makes, in memory."""
    from raysegment.data.dataset import grid_slice

    images, labels = [], []
    for v in volumes:
        padded = np.pad(v.image, ((1, 1), (0, 0), (0, 0)))
        for k in range(v.image.shape[0]):
            img = padded[k : k + 3] if config.model.context_slices else v.image[k]
            i, lab = grid_slice(img, v.label[k], config.image_size, v.spacing, config.pixel_mm)
            images.append(i)
            labels.append(lab)
    return torch.stack(images), torch.stack(labels)


def fit_local(config: TrainConfig, volumes, device: str = "cpu", log=print):
    """Train on in-memory volumes in this process, without Ray: the Ray loop's ``train_step``,
    augmentation, learning-rate schedule and time-budget planning, no validation, no checkpoints.
    For many small runs on one GPU (the cross-validation folds of ``raysegment.analysis.diagnosis``).
    Returns the bare model (eval mode) and the per-epoch history."""
    dev = torch.device(device)
    torch.manual_seed(config.seed)
    images, labels = slice_tensors(volumes, config)
    run = restore_run(config, None, lambda m: m.to(dev), dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    n, steps_est = len(images), max(1, len(images) // config.batch_size)
    if config.max_steps_per_epoch:
        steps_est = min(steps_est, config.max_steps_per_epoch)
    t_start, total = time.perf_counter(), config.epochs
    for epoch in range(config.epochs):
        if epoch >= total:
            break
        gen = torch.Generator().manual_seed(epoch_seed(config, epoch))
        order = torch.randperm(n, generator=gen)
        run.model.train()
        batches = ((images[idx], labels[idx]) for idx in
                   (order[step * config.batch_size : (step + 1) * config.batch_size] for step in range(steps_est)))
        loss_sum, _ = run_steps(run.model, run.optimizer, run.scaler, batches, config, epoch=epoch, total_epochs=total,
                                steps_est=steps_est, generator=gen, device=dev, dtype=run.dtype)
        elapsed = time.perf_counter() - t_start
        total = planned_epochs(config, epoch + 1, elapsed)
        run.history.append({"epoch": epoch, "loss": float(loss_sum) / steps_est, "elapsed_s": round(elapsed, 1)})
        log(f"[raysegment] epoch {epoch + 1}/{total} loss {run.history[-1]['loss']:.4f} ({elapsed / 60:.1f} min)")
    return run.core.eval(), run.history


def train_local(config: TrainConfig, device: str, out: Path, log=print) -> list[dict]:
    """One run in this process without Ray (``python -m raysegment.train --local DEVICE``): ``fit_local``
    on the train split of ``config.data`` (shards or a ``pack`` bundle), then its last epoch scored on
    the val split by the Ray loop's own validation and written to ``out`` (.safetensors: fp16, the
    config, the history with that val Dice on its last entry). Returns that history."""
    from raysegment.analysis.metrics import dice_summary
    from raysegment.data.dataset import load_volumes
    from raysegment.model.weights import save_weights
    from raysegment.training.validation import validate

    if config.threads_per_worker:
        torch.set_num_threads(config.threads_per_worker)
    model, history = fit_local(config, load_volumes(config.data, "train"), device, log)
    dice = dice_summary(validate(model, load_volumes(config.data, "val"), config, torch.device(device)))
    history[-1].update(dice, validated_epoch=history[-1]["epoch"])
    save_weights(model.state_dict(), json.dumps(config.to_dict()), out,
                 run_state=json.dumps({"epoch": len(history) - 1, "history": history}))
    return history
