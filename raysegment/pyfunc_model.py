"""MLflow pyfunc model defined from code (no pickled Python objects).

MLflow loads this file, and the model rebuilds itself from the logged artifact folder
``checkpoint/`` (``model.pt`` state dict read with ``weights_only=True``, ``config.json``).
``predict`` takes one image volume (z, H, W) or slice (H, W), any intensity scale, and returns
a uint8 label mask of the same shape (0 bg, 1 RV, 2 MYO, 3 LV).
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
from mlflow.models import set_model


class RaysegmentPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from raysegment.train import load_checkpoint_model

        self.model, self.config, _ = load_checkpoint_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        from raysegment.models import predict_volume
        from raysegment.prepare import normalize_intensity

        if isinstance(model_input, dict):  # a named-tensor signature hands over {name: array}
            (model_input,) = model_input.values()
        image = np.asarray(model_input, dtype=np.float32)
        squeeze = image.ndim == 2
        if squeeze:
            image = image[None]
        if image.ndim != 3:
            raise ValueError(f"expected a (z, H, W) volume or an (H, W) slice, got shape {image.shape}")
        mask = predict_volume(self.model, normalize_intensity(image), self.config.image_size)
        return mask[0] if squeeze else mask


set_model(RaysegmentPyfunc())
