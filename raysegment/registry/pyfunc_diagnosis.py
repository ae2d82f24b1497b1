"""MLflow pyfunc of the diagnosis classifier, defined from code (its artifact is the model's JSON).

``predict`` takes a DataFrame of one of two kinds and returns a DataFrame of ``group`` and one
``p_<GROUP>`` column per class:

* rows of patient indices (the ``raysegment.analysis.diagnosis.INDEX_KEYS`` columns: volumes in mL,
  mass in g, EF in %, thickness in mm; ``bsa_m2`` and the per-m² columns optional) — what
  ``raysegment.clinical`` returns and the batch job's results.csv holds — are diagnosed as the batch
  job does (``analysis.patient.diagnose``): volumes without per-m² values are indexed by the row's
  ``bsa_m2``, else by the model's training median BSA; a ``diagnosis_withheld`` column names the
  rows given no group;
* else feature rows (the ``FEATURES`` columns); a NaN column takes its training median.

Anything else (a table without either set of columns) is refused with the columns it takes.

Imports ``analysis`` only; nothing above ``registry`` (MLflow loads this file as the model's code).
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
        from raysegment.analysis.diagnosis import FEATURES, INDEX_KEYS

        p_cols = [f"p_{c}" for c in self.model.classes]
        if hasattr(model_input, "columns") and set(INDEX_KEYS) <= set(model_input.columns):
            return pd.DataFrame([self._diagnose(row, p_cols) for row in model_input.to_dict("records")])
        named = hasattr(model_input, "columns") and set(FEATURES) <= set(model_input.columns)
        x = np.atleast_2d(np.asarray(model_input[list(FEATURES)] if named else model_input, float))
        if x.shape[1] != len(FEATURES):
            raise ValueError(f"takes rows of patient indices (columns {', '.join(INDEX_KEYS)}; bsa_m2 optional) or "
                             f"the {len(FEATURES)} feature columns ({', '.join(FEATURES)})")
        p = self.model.predict_proba(x)
        out = pd.DataFrame(p, columns=p_cols)
        out.insert(0, "group", [self.model.classes[i] for i in p.argmax(1)])
        return out

    def _diagnose(self, row: dict, p_cols: list[str]) -> dict:
        from raysegment.analysis.diagnosis import FEATURES, INDEX_KEYS
        from raysegment.analysis.patient import diagnose

        unknown = {f: np.nan for f in FEATURES if f.endswith("_per_m2")} | {"bsa_m2": np.nan}
        ind = unknown | {k: np.nan if v is None else float(v) for k, v in row.items() if k in unknown or k in INDEX_KEYS}
        got = diagnose(ind, self.model)
        return {"group": got.get("diagnosis"), **{c: got.get(c, np.nan) for c in p_cols},
                "diagnosis_withheld": got.get("diagnosis_withheld", "")}


set_model(DiagnosisPyfunc())
