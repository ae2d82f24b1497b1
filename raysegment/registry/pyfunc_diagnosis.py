"""MLflow pyfunc of the diagnosis classifier, defined from code (its artifact is the model's JSON).

``predict`` takes feature rows (a DataFrame with the ``raysegment.analysis.diagnosis.FEATURES`` columns, or an
(N, features) array) and returns a DataFrame: ``group`` and one ``p_<GROUP>`` column per class. A row
of a patient without height or weight is best made by ``DiagnosisModel.features`` (its volumes indexed
by the model's training median BSA); NaN columns take their training medians one by one.
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import set_model


class DiagnosisPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from pathlib import Path

        from raysegment.analysis.diagnosis import DiagnosisModel

        self.model = DiagnosisModel.from_json(Path(context.artifacts["diagnosis"]).read_text())

    # A hint MLflow infers no schema from (see pyfunc_model.py): no type-hint reminder on log or load.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        from raysegment.analysis.diagnosis import FEATURES

        x = model_input[list(FEATURES)].to_numpy(float) if hasattr(model_input, "columns") else np.asarray(model_input, float)
        p = self.model.predict_proba(x)
        out = pd.DataFrame(p, columns=[f"p_{c}" for c in self.model.classes])
        out.insert(0, "group", [self.model.classes[i] for i in p.argmax(1)])
        return out


set_model(DiagnosisPyfunc())
