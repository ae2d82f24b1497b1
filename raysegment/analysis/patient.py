"""One patient's assessment from its ED and ES label volumes: clinical indices after the basal ES
check, QC flags and the ACDC diagnosis. The batch job (``inference.ledger.add_patient_clinical``),
the service's JSON answer and ``raysegment.clinical`` all call ``assess``; the registered diagnosis
pyfunc calls ``diagnose`` on rows of indices.

Imports ``analysis.clinical`` and ``analysis.basal`` (the diagnosis model comes as an argument); nothing above ``analysis``.
"""

from __future__ import annotations

import numpy as np

from raysegment.analysis.basal import checked_indices
from raysegment.analysis.clinical import patient_flags


def assess(ed_zyx: np.ndarray, es_zyx: np.ndarray, spacing_zyx, height_cm: float | None = None,
           weight_kg: float | None = None, diagnosis=None) -> dict:
    """Indices of ``clinical.patient_indices`` (mL, %, g, mm; BSA m² and per-m² values with height and
    weight), rounded to 4 decimals, taken after ``diagnosis``'s basal ES check (what it did, too);
    ``patient_qc_flags`` (";"-joined); and with a ``diagnosis`` model (``analysis.diagnosis``) the
    group and ``p_<GROUP>``, or ``diagnosis_withheld`` where the LV's ES volume exceeds its ED's."""
    ind, basal = checked_indices(ed_zyx, es_zyx, spacing_zyx, height_cm, weight_kg,
                                 diagnosis.basal_rv if diagnosis else None)
    flags = patient_flags(ind, height_cm, weight_kg)
    out = {k: round(v, 4) for k, v in ind.items()} | basal | {"patient_qc_flags": ";".join(flags)}
    return out | (diagnose(ind, diagnosis) if diagnosis is not None else {})


def diagnose(ind: dict, diagnosis) -> dict:
    """``diagnosis``'s group and ``p_<GROUP>`` (4 decimals) of one patient's indices (those of
    ``clinical.patient_indices``, taken after its basal ES check), or ``diagnosis_withheld``
    (``es_above_ed_lv``; ``no_volumes``: NaN volumes)."""
    if not np.isfinite([ind[k] for k in ("lv_edv_ml", "lv_esv_ml", "rv_edv_ml", "rv_esv_ml")]).all():
        return {"diagnosis_withheld": "no_volumes"}  # a row of a patient whose masks could not be read
    if "es_above_ed_lv" in patient_flags(ind):
        # A negative LV EF: ED and ES swapped, or a mask gone wrong; a group from it would be made
        # up. (ACDC picks ED and ES by the LV; a slightly negative RV EF is a real, akinetic RV's.)
        return {"diagnosis_withheld": "es_above_ed_lv"}
    p = diagnosis.predict_proba(diagnosis.features(ind))[0]
    return {"diagnosis": diagnosis.classes[int(p.argmax())]} | {f"p_{c}": round(float(q), 4)
                                                              for c, q in zip(diagnosis.classes, p)}
