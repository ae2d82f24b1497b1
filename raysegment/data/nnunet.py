"""ACDC in nnU-Net's raw layout, what an nnU-Net user has on disk (nnU-Net v2's ``Dataset027_ACDC``
conversion of the official release): ``imagesTr/patientNNN_frameFF_0000.nii.gz``,
``labelsTr/patientNNN_frameFF.nii.gz`` and ``dataset.json`` (labels RV 1, MLV 2, LVC 3). The
conversion drops ``Info.cfg``: ED is a patient's lower frame number, ES the higher (ACDC's ED comes
before its ES in all 80 patients here: ED frames 1–4, ES 6–16, ``info.csv``), the group follows
the patient number as for SSL4MIS files, height and weight are unknown.

Imports ``data.volumes`` and ``io``; nothing above ``data``.
"""

from __future__ import annotations

import json
from pathlib import Path

from raysegment.data.volumes import PHASES, MissingLabels, PrepareError, Volume, _group_from_number, read_labelled_nifti
from raysegment.io.studies import NNUNET_FRAME, nnunet_labels_path, study_stem

IMAGES = "imagesTr"
# What each class is called in a dataset.json (nnU-Net's ACDC conversion: RV, MLV, LVC).
_NAMES = {1: {"rv"}, 2: {"mlv", "myo", "myocardium", "lv_myo"}, 3: {"lvc", "lv", "lv_cavity"}}


def check_dataset_json(source: Path) -> None:
    """PrepareError unless ``source/dataset.json`` describes one channel and labels 1 RV, 2 MYO, 3 LV
    (nnU-Net v2's ``{name: value}`` or v1's ``{"value": name}``), the classes raysegment segments."""
    path = source / "dataset.json"
    try:
        doc = json.loads(path.read_text())
        labels = doc["labels"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrepareError(f"{path}: unreadable nnU-Net dataset.json ({type(exc).__name__}: {exc})") from None
    try:
        by_value = ({int(v): str(k) for k, v in labels.items()} if all(str(v).isdigit() for v in labels.values())
                    else {int(k): str(v) for k, v in labels.items()})
    except (ValueError, TypeError, AttributeError):  # region-based labels (lists of values), or no mapping
        by_value = {}
    wrong = [v for v, names in _NAMES.items() if str(by_value.get(v, "")).lower() not in names]
    if wrong or set(by_value) - {0, 1, 2, 3}:
        raise PrepareError(f"{path}: labels {labels} are not ACDC's (1 RV, 2 MLV/MYO, 3 LVC/LV, as nnU-Net's "
                           f"Dataset027_ACDC has them)")
    channels = doc.get("channel_names", doc.get("modality", {"0": "MRI"}))
    if len(channels) != 1:
        raise PrepareError(f"{path}: {len(channels)} input channels {channels}; raysegment segments one (cine MRI)")


def images_folder(source: Path) -> tuple[Path, Path]:
    """(dataset folder, images folder) of a source: the dataset (its ``imagesTr``), or one of its
    ``imagesXx`` folders itself (``imagesTs``: the ACDC test patients the conversion put there)."""
    return (source.parent, source) if source.name.startswith("images") else (source, source / IMAGES)


def nnunet_cases(source: Path) -> dict[str, list[tuple[int, Path]]]:
    """Patient → its (frame number, image file) pairs in ``imagesTr`` (or in ``source`` itself where it
    is an ``imagesXx`` folder); PrepareError for a file there whose name is no ACDC case
    (``patientNNN_frameFF_0000.nii.gz``)."""
    root, images = images_folder(source)
    check_dataset_json(root)
    cases: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(p for p in images.iterdir() if p.is_file() and not p.name.startswith(".")):
        m = NNUNET_FRAME.match(study_stem(path)) if path.name.endswith(".nii.gz") else None
        if not m:
            raise PrepareError(f"{path}: not an ACDC case of nnU-Net's layout (patientNNN_frameFF_0000.nii.gz; "
                               f"one channel)")
        cases.setdefault(m.group(1), []).append((int(m.group(2)), path))
    if not cases:
        raise PrepareError(f"{images}: empty: no patientNNN_frameFF_0000.nii.gz files")
    return cases


def read_nnunet_patient(patient: str, images: tuple[Path, ...]) -> list[Volume]:
    """ED (the lower frame number) and ES of one patient (its ``imagesXx`` files), each with its
    ``labelsXx`` labels."""
    folder = images[0].parent
    if len(images) != 2:
        raise PrepareError(f"{folder}: {patient} has {len(images)} frames "
                           f"({', '.join(p.name for p in images)}); ACDC labels two, ED and ES")
    ordered = sorted((int(NNUNET_FRAME.match(study_stem(p)).group(2)), p) for p in images)
    info = {"height_cm": None, "weight_kg": None, "nb_frames": None, "ed_frame": ordered[0][0], "es_frame": ordered[1][0]}
    volumes = []
    for phase, (frame, image) in zip(PHASES, ordered):
        label = nnunet_labels_path(folder) / f"{patient}_frame{frame:02d}.nii.gz"
        if not label.is_file():
            raise MissingLabels(f"{label}: missing labels of {image.name}")
        volumes.append(read_labelled_nifti(image, label, patient, phase, _group_from_number(patient), info))
    return volumes
