"""Clinical indices from label volumes (mL, g, %) and plausibility checks (QC flags)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from raysegment import CLASS_NAMES

MYOCARDIUM_DENSITY_G_PER_ML = 1.05
# QC bounds (mL) for a single cavity or myocardium of an adult heart; outside is implausible.
PLAUSIBLE_ML = (2.0, 500.0)


def voxel_counts(mask_zyx: np.ndarray) -> np.ndarray:
    """Voxels of each label (index = label, background included)."""
    return np.bincount(mask_zyx.ravel(), minlength=len(CLASS_NAMES) + 1)


def volumes_ml(mask_zyx: np.ndarray, zooms_xyz, counts: np.ndarray | None = None) -> dict[str, float]:
    """Volume (mL) of each structure: voxel count × voxel volume (``zooms_xyz`` in mm); pass the
    mask's ``voxel_counts`` when they are at hand."""
    voxel_ml = float(np.prod(zooms_xyz)) / 1000.0
    counts = voxel_counts(mask_zyx) if counts is None else counts
    return {name: float(counts[lab]) * voxel_ml for lab, name in CLASS_NAMES.items()}


def myocardial_mass_g(myo_ml: float) -> float:
    """LV myocardial mass (g) from the myocardium's volume (mL) at 1.05 g/mL."""
    return myo_ml * MYOCARDIUM_DENSITY_G_PER_ML


def ejection_fraction(edv_ml: float, esv_ml: float) -> float:
    """EF (%) = (EDV − ESV) / EDV; NaN when the end-diastolic volume is 0."""
    return 100.0 * (edv_ml - esv_ml) / edv_ml if edv_ml > 0 else math.nan


def add_cine_ef(rows: list[dict]) -> None:
    """EF (%) for the frames of one 4-D study: ED = the frame of largest volume, ES = smallest."""
    if len(rows) < 2:
        return
    for name in ("lv", "rv"):
        vols = [r[f"volume_{name}_ml"] for r in rows]
        ef = ejection_fraction(max(vols), min(vols))
        for r in rows:
            r[f"ef_{name}_pct"] = ef


def add_patient_ef(table: list[dict]) -> None:
    """EF (%) for official-layout patients whose ED and ES frames (Info.cfg) were both segmented."""
    by_dir: dict[str, dict[str, dict]] = {}
    for r in table:
        if r.get("status") == "done" and r.get("phase") in ("ED", "ES"):
            by_dir.setdefault(str(Path(r["study"]).parent), {})[r["phase"]] = r
    for phases in by_dir.values():
        if set(phases) == {"ED", "ES"}:
            for name in ("lv", "rv"):
                ef = ejection_fraction(phases["ED"][f"volume_{name}_ml"], phases["ES"][f"volume_{name}_ml"])
                phases["ED"][f"ef_{name}_pct"] = phases["ES"][f"ef_{name}_pct"] = ef


def qc_flags(row: dict) -> list[str]:
    """``missing_<structure>`` (no voxels) or ``implausible_volume_<structure>`` (outside PLAUSIBLE_ML)."""
    flags = []
    for name in CLASS_NAMES.values():
        if row[f"voxels_{name}"] == 0:
            flags.append(f"missing_{name}")
        elif not PLAUSIBLE_ML[0] <= row[f"volume_{name}_ml"] <= PLAUSIBLE_ML[1]:
            flags.append(f"implausible_volume_{name}")
    return flags
