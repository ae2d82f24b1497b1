"""Scoring models on shards: per-volume Dice/HD95 records of a model or an ensemble, and the
figures of its predictions. Runs the Predictor over data; the rendering is ``raysegment.reporting``.

Imports ``inference.predictor``, ``reporting``, ``analysis``, ``data`` and ``config``; nothing above
``inference`` (not ``training``).
"""

from __future__ import annotations

from pathlib import Path

from raysegment.config import PredictConfig
from raysegment.reporting.report import SPLITS, learning_curves, model_history, overlay_slices


def evaluate(model_ref: str | list[str], shards: str | Path, splits=SPLITS, tracking_uri: str | None = None,
             flip_tta: bool = False, largest_component: bool = True, mask_cache: str | Path | None = None,
             levels: list[dict] | None = None, in_plane: str = "as-stored", auto_in_plane: bool = False,
             turns: dict | None = None) -> list[dict]:
    """Per-volume records (Dice, HD95, ASSD per class) of a model (or an ensemble) on the shards' splits.
    With ``mask_cache`` (a folder) each split's masks are kept there and read back, shared with
    ``report clinical`` and ``diagnosis`` given the same folder, model, settings and volumes.
    ``levels`` (a list) is extended with each volume's ``analysis.levels.level_records`` from the same
    predictions. ``in_plane`` (``config.IN_PLANE``) scores the volumes mirrored or transposed in-plane:
    what a study in another orientation than the training data's costs. ``auto_in_plane`` predicts as
    ``infer`` does (``PredictConfig.in_plane="auto"``), and ``turns`` (a dict) gets what it chose, per turn."""
    from raysegment.data.dataset import load_volumes
    from raysegment.data.volumes import in_plane as turned
    from raysegment.inference.predictor import Predictor, predict_volumes, predicted_masks

    predictor = Predictor.load(model_ref, PredictConfig(flip_tta=flip_tta, largest_component=largest_component,
                                                        in_plane="auto" if auto_in_plane else "as-stored"), tracking_uri)
    records = []
    for split in splits:
        volumes = [turned(v, in_plane) for v in load_volumes(shards, split)]
        if mask_cache is None:  # streamed: no split's masks held at once
            pairs = predict_volumes(predictor, volumes)
        else:
            masks = predicted_masks(predictor, volumes, mask_cache)
            pairs = ((v, masks[(v.patient, v.phase)]) for v in volumes)
        records += _scored(pairs, split, levels)
    if turns is not None:
        turns.update(predictor.auto_turns)
    return records


def evaluate_masks(folder: str | Path, shards: str | Path, splits=SPLITS, levels: list[dict] | None = None) -> list[dict]:
    """``evaluate``'s records for masks another tool wrote (``data.masks``: NIfTI label maps named as
    ACDC frames, e.g. nnU-Net's predictions) instead of a model's: scored as they are, no post-processing."""
    from raysegment.data.dataset import load_volumes

    volumes = {split: load_volumes(shards, split) for split in splits}
    masks = folder_masks(folder, [v for vs in volumes.values() for v in vs], shards)  # one walk of the folder
    records = []
    for split, vs in volumes.items():
        records += _scored(((v, masks[(v.patient, v.phase)]) for v in vs), split, levels)
    return records


def folder_masks(folder: str | Path, volumes: list, shards: str | Path) -> dict:
    """(patient, phase) → the mask in ``folder`` of each of ``volumes`` (``data.masks.read_masks``, with
    the frame numbers and source of the ``shards``' manifest)."""
    from raysegment.data.masks import read_masks
    from raysegment.data.prepare import load_manifest

    try:
        manifest = load_manifest(shards)  # the frame numbers masks are named by, the source's axes
    except FileNotFoundError:  # a bundle or remote shards: masks are matched by the volumes' own info
        manifest = {}
    return read_masks(Path(folder), volumes, manifest)


def _scored(pairs, split: str, levels: list[dict] | None) -> list[dict]:
    """Dice/HD95/ASSD records of (volume, predicted mask) pairs; ``levels`` extended with their level records."""
    from raysegment.analysis.levels import level_records
    from raysegment.analysis.metrics import score_records

    records = []
    for v, pred in pairs:
        records += score_records(pred, v.label, v.spacing, patient=v.patient, phase=v.phase, split=split)
        if levels is not None:
            levels += level_records(pred, v.label, v.spacing, patient=v.patient, phase=v.phase, split=split)
    return records


def figures(models: dict[str, str], shards: str | Path, out: Path, patient: str | None = None,
            tracking_uri: str | None = None) -> list[Path]:
    """learning_curves.png over ``models`` (name → model reference; the curves of those that carry
    their history: files and folders) and, per model, an overlay of one val patient's ED and ES
    volumes (prediction solid, ground truth dashed). A reference may be a folder of another tool's
    masks (``data.masks``): its overlays, no curves."""
    from raysegment.data.dataset import load_volumes
    from raysegment.data.masks import is_mask_folder
    from raysegment.inference.predictor import Predictor, _local_path, is_registry_uri, predict_volumes

    written = []
    histories = {name: h for name, ref in models.items() if not is_registry_uri(ref) and not is_mask_folder(ref)
                 and (h := model_history(str(_local_path(ref))))}
    if histories:
        written.append(learning_curves(histories, out / "learning_curves.png"))
    volumes = load_volumes(shards, "val")
    patient = patient or volumes[0].patient
    chosen = [v for v in volumes if v.patient == patient]
    for name, ref in models.items():
        if is_mask_folder(ref):
            masks = folder_masks(ref, chosen, shards)
            pairs = [(v, masks[(v.patient, v.phase)]) for v in chosen]
        else:
            pairs = predict_volumes(Predictor.load(ref, tracking_uri=tracking_uri), chosen)
        for v, pred in pairs:
            written.append(overlay_slices(v.image, pred, out / f"overlay_{name}_{v.patient}_{v.phase}.png", n_slices=4,
                                          title=f"{name}: {v.patient} {v.phase} (solid: prediction, dashed: reference)",
                                          gt_zyx=v.label))
    return written


def compare_runtimes(model_ref: str, shards: str | Path, split: str = "val", threads: int = 1,
                     tracking_uri: str | None = None) -> dict:
    """Torch fp32 against ONNX Runtime on a split's volumes, both Predictors with ``threads`` threads:
    the share of voxels whose labels agree (over all volumes and per volume, the lowest) and the
    median CPU seconds per volume of each (``python -m raysegment.bench onnx``)."""
    import time

    import numpy as np
    import torch

    from raysegment.data.dataset import load_volumes
    from raysegment.inference.predictor import Predictor

    torch.set_num_threads(threads)
    volumes = load_volumes(str(shards), split)
    runtimes = {"torch": Predictor.load(model_ref, PredictConfig(precision="fp32"), tracking_uri),
                "onnx": Predictor.load(model_ref, PredictConfig(runtime="onnx"), tracking_uri)}
    seconds: dict[str, list[float]] = {name: [] for name in runtimes}
    same, total, lowest = 0, 0, 1.0
    for v in volumes:
        masks = {}
        for name, predictor in runtimes.items():
            t0 = time.process_time()
            masks[name] = predictor.predict(v.image, spacing=v.spacing, normalized=True)
            seconds[name].append(time.process_time() - t0)
        agree = int((masks["torch"] == masks["onnx"]).sum())
        same, total = same + agree, total + masks["torch"].size
        lowest = min(lowest, agree / masks["torch"].size)
    return {"model": model_ref, "version": runtimes["torch"].version, "volumes": len(volumes), "threads": threads,
            "voxels": total, "voxels_differ": total - same, "voxels_equal": round(same / total, 6), "lowest_volume_equal": round(lowest, 6),
            **{f"{name}_cpu_s_per_volume": round(float(np.median(s)), 3) for name, s in seconds.items()}}
