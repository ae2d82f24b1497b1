"""Validation during training: 3-D Dice on whole val volumes through the serving ``Predictor``,
every k-th epoch (``TrainConfig.val_every``) and each of the last few. Imports ``inference`` and below."""

from __future__ import annotations

from raysegment.analysis.metrics import dice_summary, score_records
from raysegment.config import PredictConfig, TrainConfig
from raysegment.inference.predictor import Predictor
from raysegment.training.core import validation_due


def validate(model, volumes, config: TrainConfig, device) -> list[dict]:
    """3-D per-volume Dice records on whole val volumes (``dice_summary`` averages them), through
    the same ``Predictor`` that serves the model (in the run's precision)."""
    from raysegment.model.checkpoint import LoadedModel

    was_training = model.training
    predictor = Predictor(LoadedModel(model, config, "training"),
                          PredictConfig(device=str(device), precision=config.precision))
    records = []
    for v in volumes:
        pred = predictor.predict(v.image, spacing=v.spacing, normalized=True)
        records += score_records(pred, v.label, v.spacing, distances=False, patient=v.patient, phase=v.phase)
    model.train(was_training)
    return records


def validate_all(run, volumes, config: TrainConfig, world: int) -> dict:
    """Dice over the val volumes, every rank validating its share (a collective with several)."""
    import torch.distributed as dist

    records = validate(run.core, volumes, config, run.device)
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, records)
        records = [r for share in shares for r in share]
    return dice_summary(records)


def epoch_dice(run, volumes, config: TrainConfig, world: int, epoch: int, total_epochs: int) -> tuple[dict, int]:
    """(Dice, the epoch it was measured at): validated now when due (the same answer on every rank),
    else the latest validation's, carried (the epoch line and the metrics say which epoch)."""
    if validation_due(config, epoch, total_epochs, bool(run.history)):
        return validate_all(run, volumes, config, world), epoch
    last = run.history[-1]
    return {k: v for k, v in last.items() if k.startswith("dice_")}, last.get("validated_epoch", last["epoch"])
