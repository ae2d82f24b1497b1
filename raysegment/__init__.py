"""raysegment: cardiac MRI segmentation (ACDC) on Ray Train, Ray Tune and MLflow."""

from __future__ import annotations

from raysegment.config import CLASS_NAMES, NUM_CLASSES  # noqa: F401  (the public names)
from raysegment.config import VERSION as __version__  # noqa: F401  (the public version)
from raysegment.runtime import QUIET_ENV, disable_telemetry, quiet_environment  # noqa: F401


def segment(image, *, model, config=None, tracking_uri: str | None = None):
    """Segment a short-axis cine MRI in-process → a uint8 nibabel image (0 bg, 1 RV, 2 MYO, 3 LV).

    ``image``: a NIfTI path or a nibabel image, 3-D (x, y, z) or 4-D (x, y, z, t; every frame is
    segmented). The mask comes back on exactly the input's grid, affine and header.
    ``model``: a ``Predictor``, or what ``raysegment.infer --model`` takes (``shipped:mobilenet_v2``,
    a ``.safetensors`` file, a checkpoint folder, ``models:/NAME@ALIAS``), or a list of those (an
    ensemble). ``config``: a ``raysegment.config.PredictConfig`` (device, precision, TTA, ...).

        import raysegment
        mask = raysegment.segment("patient001_frame01.nii.gz", model="shipped:densenet121")
        mask.to_filename("patient001_frame01_seg.nii.gz")
    """
    import nibabel as nib
    import numpy as np

    from raysegment.config import PredictConfig
    from raysegment.inference.predictor import Predictor
    from raysegment.io.studies import mask_image, nifti_to_zyx, zyx_to_nifti

    predictor = model if isinstance(model, Predictor) else Predictor.load(model, config or PredictConfig(), tracking_uri)
    img = nib.load(str(image)) if not isinstance(image, nib.spatialimages.SpatialImage) else image
    data = np.asarray(img.dataobj, dtype=np.float64)
    if data.ndim not in (3, 4):
        raise ValueError(f"expected a 3-D or 4-D image, got shape {data.shape}")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    frames = nifti_to_zyx(data if data.ndim == 4 else data[..., None])
    masks = np.stack([predictor.predict(f, spacing=zooms[::-1]) for f in frames])
    out = zyx_to_nifti(masks)
    return mask_image(out if data.ndim == 4 else out[..., 0], img)
