"""Per-class Dice, HD95 and ASSD on 3-D label volumes, and their aggregation.

Volumes are (z, y, x) integer label arrays. Distances are in mm when ``spacing`` (z, y, x mm)
is given and in voxels otherwise; every result says which in its ``unit`` field.

Empty structures (defined so that means stay finite):
- GT and prediction both empty: Dice 1, HD95 0, ASSD 0 (nothing to find, nothing found).
- exactly one empty: Dice 0, HD95 = ASSD = the grid's diagonal, the largest distance the
  grid can hold (a finite worst case).

Imports ``config`` only; nothing above ``analysis``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from raysegment.config import CLASS_NAMES


@dataclass(frozen=True)
class ClassScore:
    label: int
    dice: float
    hd95: float
    assd: float
    unit: str  # "mm" or "voxels"
    gt_voxels: int
    pred_voxels: int


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    denom = int(pred.sum()) + int(gt.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / denom


def _surface(mask: np.ndarray) -> np.ndarray:
    # Border voxels: in the mask, with a face-neighbour outside it (the image edge counts as outside).
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _directed_distances(a: np.ndarray, b: np.ndarray, sampling: Sequence[float]) -> np.ndarray:
    """Distance from each surface voxel of ``a`` to the nearest surface voxel of ``b``."""
    dist_to_b = ndimage.distance_transform_edt(~_surface(b), sampling=sampling)
    return dist_to_b[_surface(a)]


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[float, float]:
    """(HD95, ASSD) between two boolean masks, in mm with ``spacing`` else voxels."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    sampling = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * pred.ndim
    if not pred.any() and not gt.any():
        return 0.0, 0.0
    if not pred.any() or not gt.any():
        worst = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, sampling))))
        return worst, worst
    d_pg = _directed_distances(pred, gt, sampling)
    d_gp = _directed_distances(gt, pred, sampling)
    both = np.concatenate([d_pg, d_gp])
    # ASSD as in Heimann et al. 2009: the mean over the surface points of both masks.
    return float(np.percentile(both, 95)), float(both.mean())


def score_volume(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None = None,
    labels: Iterable[int] = (1, 2, 3),
    distances: bool = True,
) -> list[ClassScore]:
    """Dice (and HD95/ASSD unless ``distances=False``) for each label of one 3-D volume."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    unit = "mm" if spacing is not None else "voxels"
    scores = []
    for lab in labels:
        p, g = pred == lab, gt == lab
        hd95, assd = surface_distances(p, g, spacing) if distances else (float("nan"), float("nan"))
        scores.append(ClassScore(lab, dice(p, g), hd95, assd, unit, int(g.sum()), int(p.sum())))
    return scores


def score_records(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None = None,
    distances: bool = True,
    **keys,
) -> list[dict]:
    """``score_volume`` as flat dict rows carrying ``keys`` (e.g. patient=, phase=) and ``class``."""
    return [
        {**keys, "class": CLASS_NAMES[s.label], **asdict(s)}
        for s in score_volume(pred, gt, spacing, distances=distances)
    ]


def aggregate(records: Sequence[dict], by: Sequence[str] = ("class",)) -> list[dict]:
    """Mean Dice/HD95/ASSD of ``records`` grouped by the ``by`` keys (e.g. class, phase, patient).

    Each output row holds the keys, ``n`` (volumes) and the means; units must agree per group.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    rows = []
    for key, rs in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        units = {r["unit"] for r in rs}
        if len(units) > 1:
            raise ValueError(f"group {key} mixes units {sorted(units)}")
        rows.append(
            {
                **dict(zip(by, key)),
                "n": len(rs),
                "dice": float(np.mean([r["dice"] for r in rs])),
                "hd95": float(np.mean([r["hd95"] for r in rs])),
                "assd": float(np.mean([r["assd"] for r in rs])),
                "unit": units.pop(),
            }
        )
    return rows


def dice_summary(records: Sequence[dict]) -> dict[str, float]:
    """``{'dice_rv', 'dice_myo', 'dice_lv', 'dice_mean'}``: per-volume 3-D Dice averaged over volumes."""
    out = {f"dice_{row['class']}": row["dice"] for row in aggregate(records, by=("class",))}
    out["dice_mean"] = float(np.mean([out[f"dice_{n}"] for n in CLASS_NAMES.values()]))
    return out


def rows_dice_summary(rows: Sequence[dict]) -> dict[str, float] | None:
    """``dice_summary`` of a batch job's result rows: the done study frames scored against a ``_gt``
    file (``dice_rv``, … on the row), plus ``volumes`` (how many); None when none was."""
    scored = [r for r in rows if r.get("status") == "done"
              and all(r.get(f"dice_{n}") is not None for n in CLASS_NAMES.values())]
    if not scored:
        return None
    out = {f"dice_{n}": float(np.mean([r[f"dice_{n}"] for r in scored])) for n in CLASS_NAMES.values()}
    return {"volumes": len(scored), **out, "dice_mean": float(np.mean(list(out.values())))}
