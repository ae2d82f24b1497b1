"""Dice and volume error by level of the heart — base, mid-ventricle, apex — as ACDC papers break
them down (most errors sit at the base and the apex).

A volume's levels: the slices on which its reference draws any structure, cut into three equal runs
from base to apex (the base found by ``basal.base_at_end``, as the basal ES check finds it); slices beyond the reference
on the base side count as base, beyond it on the apex side as apex, so a structure predicted where
the reference has none is charged to the level it spills from.

Imports numpy and ``analysis.clinical`` only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from raysegment.analysis.basal import base_at_end
from raysegment.config import CLASS_NAMES

LEVELS = ("base", "mid", "apex")
MISS_SHARE = 0.1  # a slice drawing less than this share of the other mask's area of a structure misses it


def level_slices(gt_zyx: np.ndarray) -> dict[str, np.ndarray]:
    """Slice indices (into ``gt_zyx``) of each level; every slice is in exactly one. Empty arrays for
    every level when the reference draws nothing (its volume then has no level rows to score)."""
    z = gt_zyx.shape[0]
    order = np.arange(z)[::-1] if base_at_end(gt_zyx) else np.arange(z)  # base first
    drawn = np.flatnonzero((gt_zyx[order] > 0).reshape(z, -1).any(1))
    if drawn.size == 0:
        return {lev: np.array([], dtype=int) for lev in LEVELS}
    first, last = int(drawn[0]), int(drawn[-1])
    runs = np.array_split(np.arange(first, last + 1), 3)
    runs[0] = np.concatenate([np.arange(0, first), runs[0]])
    runs[2] = np.concatenate([runs[2], np.arange(last + 1, z)])
    return {lev: np.sort(order[r]) for lev, r in zip(LEVELS, runs)}


def level_records(pred_zyx: np.ndarray, gt_zyx: np.ndarray, spacing_zyx: Sequence[float] | None,
                  **keys) -> list[dict]:
    """One row per level and class: ``dice`` on that level's slices (NaN where neither mask has the
    structure there), ``gt_ml`` and ``pred_ml`` (mL; NaN without ``spacing_zyx``, mm), ``slices``,
    ``missed`` and ``extra`` (how many slices one mask draws the structure on and the other under
    ``MISS_SHARE`` of its area) and ``missed_slices`` / ``extra_slices`` ([slice index, voxels the
    reference / prediction draws there]); rows carry ``keys`` (patient=, …)."""
    if pred_zyx.shape != gt_zyx.shape:
        raise ValueError(f"prediction shape {pred_zyx.shape} != ground truth shape {gt_zyx.shape}")
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0 if spacing_zyx is not None else float("nan")
    rows = []
    for level, idx in level_slices(gt_zyx).items():
        p_all, g_all = pred_zyx[idx], gt_zyx[idx]
        for lab, name in CLASS_NAMES.items():
            p, g = p_all == lab, g_all == lab
            a_p, a_g = p.sum(axis=(1, 2)), g.sum(axis=(1, 2))  # per slice, voxels
            n_p, n_g = int(a_p.sum()), int(a_g.sum())
            d = 2.0 * int((p & g).sum()) / (n_p + n_g) if n_p + n_g else float("nan")
            missed = [[int(k), int(a)] for k, a, m in zip(idx, a_g, (a_g > 0) & (a_p < MISS_SHARE * a_g)) if m]
            extra = [[int(k), int(a)] for k, a, m in zip(idx, a_p, (a_p > 0) & (a_g < MISS_SHARE * a_p)) if m]
            rows.append({**keys, "level": level, "class": name, "slices": int(idx.size), "dice": d,
                         "gt_ml": n_g * voxel_ml, "pred_ml": n_p * voxel_ml, "missed": len(missed), "extra": len(extra),
                         "missed_slices": missed, "extra_slices": extra})
    return rows


def level_summary(records: Sequence[dict]) -> list[dict]:
    """Per level and class over ``records``: mean Dice (volumes where either mask has the structure
    at that level; ``n``), the mean and mean absolute volume error pred − ref (mL), and the slices
    ``missed`` and drawn ``extra`` (sums)."""
    out = []
    for level in LEVELS:
        for name in CLASS_NAMES.values():
            rs = [r for r in records if r["level"] == level and r["class"] == name]
            if not rs:
                continue
            n, dice = _mean_present([r["dice"] for r in rs])
            err = np.array([r["pred_ml"] - r["gt_ml"] for r in rs])
            out.append({"level": level, "class": name, "n": n, "dice": dice,
                        "error_ml": float(err.mean()), "abs_error_ml": float(np.abs(err).mean()),
                        "missed": sum(r["missed"] for r in rs), "extra": sum(r["extra"] for r in rs)})
    return out


def rows_level_dice(rows: Sequence[dict]) -> dict[str, dict[str, float]] | None:
    """Level → class → mean Dice over a batch job's done result rows that carry ``dice_<class>_<level>``
    (frames scored against a ``_gt`` file), averaged over the frames where either mask has the
    structure at that level (NaN where none has); None when no row was scored."""
    scored = [r for r in rows if r.get("status") == "done" and r.get(f"dice_lv_{LEVELS[0]}") is not None]
    if not scored:
        return None
    out = {}
    for level in LEVELS:
        out[level] = {}
        for name in CLASS_NAMES.values():
            out[level][name] = _mean_present([float(r[f"dice_{name}_{level}"]) for r in scored])[1]
    return out


def _mean_present(dice: Sequence[float]) -> tuple[int, float]:
    """(how many are not NaN, their mean; NaN when none is): a level's Dice is NaN in a volume where
    neither mask has the structure there, which says nothing about the model."""
    present = [d for d in dice if not np.isnan(d)]
    return len(present), float(np.mean(present)) if present else float("nan")
