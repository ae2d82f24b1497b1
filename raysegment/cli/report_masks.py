"""Where ``python -m raysegment.report``'s masks come from: a model's predictions (through the mask
cache), ``diagnosis crossval-masks`` folders, or a folder another tool wrote (``data.masks``); the shards'
volumes, metadata and basal check they are measured with. CLI layer: may import every stage."""

from __future__ import annotations

import sys
from pathlib import Path

from raysegment.config import PredictConfig
from raysegment.data.masks import is_mask_folder

# Masks another tool wrote, as ``data.masks`` reads them.
MASKS_HELP = ("a folder of predicted masks another tool wrote (nnU-Net, MONAI, `infer`): NIfTI label maps 0-3 named "
              "as ACDC frames (patient001_frame01[_suffix].nii.gz), on the original frames' grid")


def clinical_context(a) -> tuple[list, dict, dict | None]:
    """The volumes of ``a.splits``, the manifest's patient metadata and the basal ES check (or None)."""
    from raysegment.data.dataset import load_volumes
    from raysegment.data.prepare import load_manifest

    patients = load_manifest(a.data).get("patients", {})
    volumes = [v for split in a.splits for v in load_volumes(a.data, split)]
    if a.basal_check == "none":
        return volumes, patients, None
    from raysegment.analysis.diagnosis import load

    return volumes, patients, load(a.basal_check, a.mlflow_uri).basal_rv


def given_masks(folder: Path, volumes: list, data: str) -> tuple[dict, str]:
    """(patient, phase) → the masks in ``folder`` (a ``diagnosis crossval-masks`` folder, else another
    tool's NIfTI masks, ``data.masks``), and how the table names them."""
    if any(Path(folder).glob("fold*.npz")):
        from raysegment.analysis.diagnosis import load_crossval_masks

        return load_crossval_masks(folder, volumes), f"cross-validated masks in {folder}"
    from raysegment.inference.evaluation import folder_masks

    if not is_mask_folder(folder):
        raise ValueError(f"{folder}: neither NIfTI masks named as ACDC frames (patient001_frame01[_suffix].nii.gz) "
                         "nor the fold*.npz of `python -m raysegment.diagnosis crossval-masks`")
    return folder_masks(folder, volumes, data), f"the masks in {folder}"


def axes_note(a) -> None:
    """One line on stderr where masks folders are scored on shards whose source gives no NIfTI axes here
    (HDF5, or a source not on this machine): those masks are read as stored, not turned."""
    from raysegment.data.masks import source_frames
    from raysegment.data.prepare import load_manifest

    sides = [r for refs in (getattr(a, "a", None) or [], getattr(a, "b", None) or []) for r in refs]
    folders = [str(a.masks)] if getattr(a, "masks", None) else [r for r in sides if is_mask_folder(r)]
    if not folders or not a.data:
        return
    try:
        manifest = load_manifest(a.data)
    except FileNotFoundError:
        manifest = {}
    if not source_frames(manifest):
        print(f"note: {a.data}'s source ({manifest.get('source_format', 'unknown')}) gives no NIfTI axes here: "
              f"{', '.join(folders)} read as stored, so the masks must have the original frames' axes", file=sys.stderr)


def model_masks(refs: list[str], volumes: list, a, flip_tta: bool = False) -> dict:
    """(patient, phase) → the masks of model ``refs`` (repeat: an ensemble), through ``a.mask_cache``."""
    from raysegment.cli.args import progress_line
    from raysegment.inference.predictor import Predictor, predicted_masks

    return predicted_masks(Predictor.load(refs, PredictConfig(flip_tta=flip_tta), a.mlflow_uri), volumes,
                           a.mask_cache, progress_line(" + ".join(refs)))
