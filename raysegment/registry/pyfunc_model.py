"""MLflow pyfunc model defined from code (no pickled Python objects).

MLflow loads this file, and the model rebuilds itself from the logged artifact folder
``checkpoint/`` (``model.pt`` state dict read with ``weights_only=True``, ``config.json``).
``predict`` takes one image volume (z, H, W) or slice (H, W), any intensity scale, and returns
a uint8 label mask of the same shape (0 bg, 1 RV, 2 MYO, 3 LV). It is the same ``Predictor``
that ``raysegment.inference.batch`` and ``report`` use (default ``PredictConfig``), so it gives the same
masks; pass ``params={"spacing_mm": [z, y, x]}`` when the spacing is known (as infer knows it
from the NIfTI header), else the RV contact distance is in pixels. ``params={"in_plane": HOW}``
(default "auto", as ``infer``): how the volume's rows and columns lie against the training data's
(``raysegment.config.IN_PLANE``, or "auto" to choose as-stored or rows-reversed from the models'
confidence); the mask comes back on the input's grid either way. An ensemble version averages
its members' softmax.

Imports ``inference``, ``model`` and ``config``; nothing above ``registry`` (MLflow loads this file
as the model's code).
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
from mlflow.models import set_model

from raysegment.config import IN_PLANE_CHOICES


class RaysegmentPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from pathlib import Path

        from raysegment.inference.predictor import Predictor
        from raysegment.model.checkpoint import load_checkpoint

        if "members" in context.artifacts:  # a raysegment-ensemble version: members/0, members/1, ...
            folders = sorted((p for p in Path(context.artifacts["members"]).iterdir() if p.is_dir()),
                             key=lambda p: int(p.name))
        else:
            folders = [Path(context.artifacts["checkpoint"])]
        self.predictor = Predictor([load_checkpoint(f) for f in folders])

    # np.ndarray is a hint MLflow infers no schema from: the explicit signature stays the contract,
    # and MLflow no longer asks for type hints each time the model is logged or loaded.
    def predict(self, context, model_input: np.ndarray, params=None):
        if isinstance(model_input, dict):  # a named-tensor signature hands over {name: array}
            (model_input,) = model_input.values()
        image = np.asarray(model_input, dtype=np.float32)
        squeeze = image.ndim == 2
        if squeeze:
            image = image[None]
        if image.ndim != 3:
            raise ValueError(f"expected a (z, H, W) volume or an (H, W) slice, got shape {image.shape}")
        spacing = (params or {}).get("spacing_mm") or None
        if spacing is not None and len(spacing) != 3:
            raise ValueError(f"spacing_mm must be (z, y, x) in mm, got {spacing}")
        in_plane = (params or {}).get("in_plane") or "auto"
        if in_plane not in IN_PLANE_CHOICES:
            raise ValueError(f"in_plane must be one of {IN_PLANE_CHOICES}, got {in_plane!r}")
        mask = self.predictor.predict(image, spacing=spacing, in_plane=in_plane)
        return mask[0] if squeeze else mask


set_model(RaysegmentPyfunc())
