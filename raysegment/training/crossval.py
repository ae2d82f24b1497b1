"""Cross-validated masks for the diagnosis: train a segmenter per fold with the local loop and
segment the held-out patients (``python -m raysegment.diagnosis crossval-masks``), or segment them
with the ensemble of several such runs' fold models (``crossval-ensemble``). Training layer.

Imports ``training.local``, ``inference``, ``analysis``, ``model``, ``data`` and ``config``; not
``service``, ``soak`` or ``cli``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from raysegment.analysis.diagnosis import fold_of
from raysegment.data.prepare import Volume


def crossval_fold(volumes: list[Volume], fold: int, folds: int, config, device: str, out: Path, seed: int = 0,
                  keep_model: bool = False) -> dict:
    """Train a segmenter on every patient outside ``fold`` and segment the patients inside it.

    Writes ``fold{K}.npz`` (raw argmax masks, key ``patient/phase``: post-processing is left to the
    reader, who knows the true spacing) and ``fold{K}.json`` (patients, history, config); with
    ``keep_model`` also the fold's model, ``fold{K}.safetensors`` (for ``crossval_ensemble``)."""

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
    out.mkdir(parents=True, exist_ok=True)
    if keep_model:
        from raysegment.model.weights import save_weights

        save_weights(model.state_dict(), json.dumps(config.to_dict()), out / f"fold{fold}.safetensors",
                     run_state=json.dumps({"epoch": len(history) - 1, "history": history}))
    _segment_held(predictor, volumes, held, out / f"fold{fold}.npz")
    summary = {"fold": fold, "folds": folds, "seed": seed, "patients": held, "train_patients": len({v.patient for v in train}),
               "minutes": round((time.perf_counter() - t0) / 60, 2), "history": history, "config": config.to_dict()}
    (out / f"fold{fold}.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _segment_held(predictor, volumes: list[Volume], held: list[str], path: Path) -> None:
    """Raw masks of the ``held`` patients' volumes → ``path`` (.npz, key ``patient/phase``)."""
    from raysegment.inference.predictor import predict_volumes

    held_volumes = [v for v in volumes if v.patient in held]
    np.savez_compressed(path, **{f"{v.patient}/{v.phase}": m for v, m in predict_volumes(predictor, held_volumes)})


def _member_folds(members: list[Path]) -> list[str]:
    """The fold names (``fold0`` …) every member folder holds both files of, checked before any work:
    a member without them, or with other folds, raises ``ValueError`` (it failed after the first
    fold's segmentation, with a traceback)."""
    held = []
    for m in members:
        folds = {p.stem for p in m.glob("fold*.safetensors") if p.with_suffix(".json").is_file()}
        if not folds:
            raise ValueError(f"--member {m}: no fold*.safetensors with its fold*.json "
                             f"(make it with crossval-masks --keep-models)")
        held.append(folds)
    if any(f != held[0] for f in held):
        raise ValueError("the --member folders hold other folds (" +
                         "; ".join(f"{m}: {', '.join(sorted(f))}" for m, f in zip(members, held)) + ")")
    return sorted(held[0])


def crossval_ensemble(volumes: list[Volume], members: list[Path], out: Path, device: str = "cpu") -> list[dict]:
    """Fold masks of an ensemble: for every fold K that each ``members`` folder (a ``crossval-masks
    --keep-models`` run, one per backbone, same folds and seed) holds, segment fold K's patients
    with the softmax-averaged fold-K models, as the ensemble Predictor does. Writes ``fold{K}.npz``
    and ``fold{K}.json`` in ``out``, as ``crossval_fold`` does; returns the folds' summaries."""
    from raysegment.config import PredictConfig
    from raysegment.inference.predictor import Predictor
    from raysegment.model.weights import load_weights_file

    folds = _member_folds(members)
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for name in folds:
        infos = [json.loads((m / f"{name}.json").read_text()) for m in members]
        if any((i["patients"], i["folds"], i["seed"]) != (infos[0]["patients"], infos[0]["folds"], infos[0]["seed"])
               for i in infos):
            raise ValueError(f"{name}: the members' folds hold different patients (other --folds or --seed)")
        loaded = [load_weights_file(m / f"{name}.safetensors", device) for m in members]
        predictor = Predictor(loaded, PredictConfig(device=device, precision=loaded[0].config.precision,
                                                    largest_component=False))
        _segment_held(predictor, volumes, infos[0]["patients"], out / f"{name}.npz")
        summary = {**{k: infos[0][k] for k in ("fold", "folds", "seed", "patients", "train_patients")},
                   "members": [str(m) for m in members], "epochs": [len(i["history"]) for i in infos],
                   "config": [i["config"] for i in infos]}
        (out / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
        summaries.append(summary)
    return summaries
