"""raysegment: cardiac MRI segmentation (ACDC) on Ray Train, Ray Tune and MLflow."""

from __future__ import annotations

from raysegment.config import CLASS_NAMES, NUM_CLASSES  # noqa: F401  (the public names)
from raysegment.config import VERSION as __version__  # noqa: F401  (the public version)
from raysegment.runtime import QUIET_ENV, disable_telemetry, quiet_environment  # noqa: F401


def segment(image, *, model, config=None, tracking_uri: str | None = None, series: str | None = None):
    """Segment a short-axis cine MRI in-process → a uint8 nibabel image (0 bg, 1 RV, 2 MYO, 3 LV).

    ``image``: a NIfTI path or a nibabel image, 3-D (x, y, z) or 4-D (x, y, z, t; every frame is
    segmented): the mask comes back on exactly the input's grid, affine and header. Or a folder of
    DICOM files holding one short-axis cine MR series (else name it: ``series=SeriesInstanceUID``):
    the mask is 4-D (x, y, z, frames) with the series' geometry as its affine, as ``infer`` writes it.
    ``model``: a ``Predictor``, or what ``raysegment.infer --model`` takes (``shipped:mobilenet_v2``,
    a ``.safetensors`` file, a checkpoint folder, ``models:/NAME@ALIAS``), or a list of those (an
    ensemble). ``config``: a ``raysegment.config.PredictConfig`` (device, precision, TTA, ...; default:
    ``in_plane="auto"``, as ``raysegment.infer``).

        import raysegment
        mask = raysegment.segment("patient001_frame01.nii.gz", model="shipped:densenet121")
        mask.to_filename("patient001_frame01_seg.nii.gz")
    """
    import os
    from pathlib import Path

    import nibabel as nib

    from raysegment.config import PredictConfig
    from raysegment.inference.predictor import Predictor
    from raysegment.inference.study import cine_reference, folder_cine, predict_frames
    from raysegment.io.studies import mask_image, study_arrays, zyx_to_nifti

    if not isinstance(image, (str, os.PathLike, nib.spatialimages.SpatialImage)):
        raise TypeError(f"segment() takes a NIfTI path, a nibabel image or a DICOM folder, not {type(image).__name__} "
                        f"(for an array in (z, y, x) order: Predictor.load(model).predict(array, spacing=(z, y, x mm)))")
    folder = not isinstance(image, nib.spatialimages.SpatialImage) and Path(image).is_dir()
    if series is not None and not folder:
        raise ValueError("series= names a series in a DICOM folder; image is not a folder")
    if folder:  # StudyError (a ValueError) says what the folder holds when it is not one cine series
        cine = folder_cine(Path(image), series)
        img, frames, zooms = cine_reference(cine), cine.frames, tuple(cine.spacing_zyx)[::-1]
    else:
        img = nib.load(str(image)) if not isinstance(image, nib.spatialimages.SpatialImage) else image
        frames, zooms = study_arrays(img)  # StudyError (a ValueError) says what is wrong with the image
    config = config or PredictConfig(in_plane="auto")  # a user's study: rows may run either way (as ``infer``)
    predictor = model if isinstance(model, Predictor) else Predictor.load(model, config, tracking_uri)
    out = zyx_to_nifti(predict_frames(predictor, frames, zooms)[0])
    return mask_image(out if len(img.shape) == 4 else out[..., 0], img)


def clinical(ed, es, *, height_cm: float | None = None, weight_kg: float | None = None, diagnosis="shipped",
             tracking_uri: str | None = None) -> dict:
    """A patient's clinical indices and ACDC diagnosis from its ED and ES masks, as ``infer`` computes
    them for the patients it segments (``analysis.patient.assess``).

    ``ed``, ``es``: NIfTI paths or nibabel images, 3-D label maps (0 bg, 1 RV, 2 MYO, 3 LV) on one grid,
    spacing from their headers (mm) — e.g. two frames of ``segment()``'s mask, or another tool's.
    ``height_cm``, ``weight_kg``: give the BSA (m²) and the indexed volumes (mL/m², g/m²); without them
    the diagnosis indexes by its training patients' median BSA. ``diagnosis``: 'shipped', a JSON file
    from ``python -m raysegment.diagnosis fit``, ``models:/raysegment-diagnosis@champion`` or None.
    Returns EDV, ESV, SV (mL) and EF (%) of the LV and RV, LV mass (g), wall thickness (mm), the basal
    ES check's excess, ``patient_qc_flags`` and ``diagnosis`` with ``p_<GROUP>`` (or
    ``diagnosis_withheld``); NaN where a value is unknown.

        ind = raysegment.clinical("patient001_ED_seg.nii.gz", "patient001_ES_seg.nii.gz", height_cm=184, weight_kg=95)
        ind["lv_ef_pct"], ind["diagnosis"]
    """
    import nibabel as nib
    import numpy as np

    from raysegment.analysis.diagnosis import DiagnosisModel, load
    from raysegment.analysis.patient import assess
    from raysegment.data.masks import label_map, load_label_map
    from raysegment.io.studies import nifti_zooms

    masks, spacings = [], []
    for name, mask in (("ed", ed), ("es", es)):
        given = isinstance(mask, nib.spatialimages.SpatialImage)
        img = nib.squeeze_image(mask) if given else load_label_map(mask)
        masks.append(label_map(img, name if given else mask))
        spacings.append(nifti_zooms(img)[::-1])  # StudyError (a ValueError) for a spacing ≤ 0
    if masks[0].shape != masks[1].shape or not np.allclose(spacings[0], spacings[1], atol=1e-3):
        raise ValueError(f"ed and es must be on one grid: shapes (z, y, x) {masks[0].shape} and {masks[1].shape}, "
                         f"spacing (mm) {spacings[0]} and {spacings[1]}")
    model = diagnosis if isinstance(diagnosis, DiagnosisModel) or diagnosis is None else load(diagnosis, tracking_uri)
    return assess(masks[0], masks[1], spacings[0], height_cm, weight_kg, model)
