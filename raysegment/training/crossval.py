"""Cross-validated masks for the diagnosis: train a segmenter per fold with the local loop and
segment the held-out patients (``python -m raysegment.diagnosis crossval-masks``). Training layer."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from raysegment.analysis.diagnosis import fold_of
from raysegment.data.prepare import Volume


def crossval_fold(volumes: list[Volume], fold: int, folds: int, config, device: str, out: Path, seed: int = 0) -> dict:
    """Train a segmenter on every patient outside ``fold`` and segment the patients inside it.

    Writes ``fold{K}.npz`` (raw argmax masks, key ``patient/phase``: post-processing is left to the
    reader, who knows the true spacing) and ``fold{K}.json`` (patients, history, config)."""
    import torch

    from raysegment.config import PredictConfig
    from raysegment.inference.predictor import Predictor
    from raysegment.model.checkpoint import LoadedModel
    from raysegment.training.local import fit_local

    folds_of = fold_of({v.patient: v.group for v in volumes}, folds, seed)
    held = sorted({p for p, f in folds_of.items() if f == fold})
    train = [v for v in volumes if folds_of[v.patient] != fold]
    t0 = time.perf_counter()
    model, history = fit_local(config, train, device,
                               log=lambda line: print(f"fold {fold}: {line}", file=sys.stderr, flush=True))
    predictor = Predictor(LoadedModel(model, config, f"crossval-fold{fold}"),
                          PredictConfig(device=device, precision=config.precision, largest_component=False))
    masks = {}
    with torch.no_grad():
        for v in volumes:
            if v.patient in held:
                masks[f"{v.patient}/{v.phase}"] = predictor.predict(v.image, spacing=v.spacing, normalized=True)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / f"fold{fold}.npz", **masks)
    summary = {"fold": fold, "folds": folds, "seed": seed, "patients": held, "train_patients": len({v.patient for v in train}),
               "minutes": round((time.perf_counter() - t0) / 60, 2), "history": history, "config": config.to_dict()}
    (out / f"fold{fold}.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
