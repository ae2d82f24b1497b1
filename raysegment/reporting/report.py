"""Reports: Dice tables of a model on the shards, clinical agreement, and figures (segmentation
overlays, learning curves; PNG, matplotlib, headless; the batch job's overlays are drawn without
matplotlib, in the inference actor; its report.md is ``reporting.batch``'s).

Imports ``analysis``, ``model``, ``io`` and ``config``; nothing above ``reporting``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from raysegment.config import CLASS_COLOURS, CLASS_RGB
from raysegment.io.files import atomic_write

COLOURS = CLASS_COLOURS  # RV red, MYO green, LV blue


def pyplot():
    """matplotlib's pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path, rect: tuple | None = None) -> Path:
    """Lay ``fig`` out (within ``rect``, figure fractions), write it to ``out`` (PNG, 90 dpi) and close it."""
    fig.tight_layout(**({"rect": rect} if rect else {}))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    pyplot().close(fig)
    return out


def pick_slices(mask_zyx: np.ndarray, n_slices: int) -> list[int]:
    """``n_slices`` slice indices spread basal to apical over the slices the mask touches."""
    has = [k for k in range(mask_zyx.shape[0]) if mask_zyx[k].any()] or list(range(mask_zyx.shape[0]))
    return [has[int(round(i))] for i in np.linspace(0, len(has) - 1, min(n_slices, len(has)))]


def overlay_slices(image_zyx: np.ndarray, mask_zyx: np.ndarray, out: Path, n_slices: int = 3, title: str = "",
                   gt_zyx: np.ndarray | None = None) -> Path:
    """Save ``n_slices`` basal-to-apical slices with RV/MYO/LV contours (dashed: ground truth)."""
    plt = pyplot()
    picks = pick_slices(mask_zyx, n_slices)
    fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3.4), squeeze=False)
    for ax, k in zip(axes[0], picks):
        ax.imshow(image_zyx[k], cmap="gray")
        for lab, colour in COLOURS.items():
            if (mask_zyx[k] == lab).any():
                ax.contour(mask_zyx[k] == lab, levels=[0.5], colors=colour, linewidths=1.2)
            if gt_zyx is not None and (gt_zyx[k] == lab).any():
                ax.contour(gt_zyx[k] == lab, levels=[0.5], colors=colour, linewidths=0.8, linestyles="dashed")
        ax.set_title(f"slice {k}", fontsize=9)
        ax.axis("off")
    fig.suptitle(title or "RV red, MYO green, LV blue", fontsize=9)
    return save_figure(fig, out)


def overlay_thumbnail(image_zyx: np.ndarray, mask_zyx: np.ndarray, out: Path, n_slices: int = 3) -> Path:
    """The batch job's overlay: ``n_slices`` basal-to-apical slices side by side, the image in grey
    (``image_zyx`` normalised to [0, 1]) with each structure's outline in its colour (RV red, MYO
    green, LV blue). Pure numpy + zlib, ~10 ms: no matplotlib in the inference actor."""
    import struct
    import zlib

    panels = []
    for k in pick_slices(mask_zyx, n_slices):
        grey = (np.clip(image_zyx[k], 0, 1) * 255).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        m = mask_zyx[k]
        padded = np.pad(m, 1, mode="edge")
        inner = ((padded[:-2, 1:-1] == m) & (padded[2:, 1:-1] == m) & (padded[1:-1, :-2] == m) & (padded[1:-1, 2:] == m))
        for lab, colour in CLASS_RGB.items():
            rgb[(m == lab) & ~inner] = colour
        panels += [rgb, np.zeros((m.shape[0], 4, 3), np.uint8)]  # 4-pixel black gutter
    pixels = np.concatenate(panels[:-1], axis=1)
    h, w = pixels.shape[:2]
    raw = np.concatenate([np.zeros((h, 1), np.uint8), pixels.reshape(h, w * 3)], axis=1).tobytes()  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(png))
    return out


def learning_curves(histories: dict[str, list[dict]], out: Path) -> Path:
    """Val Dice per class and train loss against epoch, one column per run."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(histories), figsize=(5 * len(histories), 6), squeeze=False)
    for col, (name, hist) in enumerate(histories.items()):
        ep = [h["epoch"] + 1 for h in hist]
        for key, colour in (("dice_rv", COLOURS[1]), ("dice_myo", COLOURS[2]), ("dice_lv", COLOURS[3]), ("dice_mean", "k")):
            axes[0][col].plot(ep, [h[key] for h in hist], color=colour, label=key)
        axes[0][col].set_title(name)
        # The range the run spends most epochs in: from the lowest class Dice after its first quarter.
        late = [h[k] for h in hist[len(hist) // 4:] for k in ("dice_rv", "dice_myo", "dice_lv")]
        axes[0][col].set_ylim(max(0.0, math.floor((min(late) - 0.05) * 20) / 20) if late else 0.0, 1)
        axes[0][col].grid(alpha=0.3)
        axes[0][col].set_ylabel("val Dice (3-D)")
        axes[0][col].legend(fontsize=8)
        axes[1][col].plot(ep, [h["loss"] for h in hist], color="k")
        axes[1][col].set_ylabel("train loss")
        axes[1][col].set_xlabel("epoch")
    return save_figure(fig, out)


SPLITS = ("train", "val")


def model_history(model_ref: str) -> list[dict]:
    """Per-epoch history (epoch, loss, val Dice) stored with a checkpoint folder or weights file."""
    from raysegment.model.weights import saved_state

    return saved_state(model_ref).get("history", [])


def _splits_of(records: list[dict]) -> list[str]:
    """The splits in ``records``, train first."""
    return sorted({r["split"] for r in records}, key=lambda s: s != "train")


def _split_phase_groups(records: list[dict], phases=("all", "ED", "ES")):
    """(split, phase, its records) for each split (train first) and phase ("all": both)."""
    for split in _splits_of(records):
        for phase in phases:
            yield split, phase, [r for r in records if r["split"] == split and phase in ("all", r["phase"])]


def dice_table(records: list[dict]) -> str:
    """Markdown: rows split × phase (all, ED, ES); columns Dice RV/MYO/LV/mean and HD95 RV/MYO/LV."""
    from raysegment.analysis.metrics import aggregate

    lines = ["| split | phase | Dice RV | Dice MYO | Dice LV | Dice mean | HD95 RV | HD95 MYO | HD95 LV |",
             "|---|---|---|---|---|---|---|---|---|"]
    for split, phase, rs in _split_phase_groups(records):
        agg = {row["class"]: row for row in aggregate(rs, by=("class",))}
        unit = agg["lv"]["unit"]
        mean = np.mean([agg[c]["dice"] for c in ("rv", "myo", "lv")])
        lines.append(f"| {split} | {phase} | " + " | ".join(f"{agg[c]['dice']:.3f}" for c in ("rv", "myo", "lv"))
                     + f" | {mean:.3f} | " + " | ".join(f"{agg[c]['hd95']:.1f}" for c in ("rv", "myo", "lv")) + " |")
    lines.append(f"\nDice and HD95 per 3-D volume, averaged over volumes; HD95 in {unit}.")
    return "\n".join(lines)


def level_table(records: list[dict], top: int = 10) -> str:
    """Markdown from ``analysis.levels.level_records`` rows: per split, phase and level (base, mid,
    apex), Dice RV/MYO/LV, the volume error pred − ref, mean (mean absolute), mL, and the slices
    missed / drawn extra; then the ``top`` largest slices missed whole, by patient, phase and class."""
    from raysegment.analysis.levels import level_summary

    lines = ["| split | phase | level | Dice RV | Dice MYO | Dice LV | error RV (mL) | error MYO (mL) | error LV (mL) "
             "| slices missed / extra: RV, MYO, LV |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for split, phase, rs in _split_phase_groups(records):
        rows = {(r["level"], r["class"]): r for r in level_summary(rs)}
        for level in dict.fromkeys(lev for lev, _ in rows):
            cls = [rows[(level, c)] for c in ("rv", "myo", "lv")]
            lines.append(f"| {split} | {phase} | {level} | " + " | ".join(f"{r['dice']:.3f}" for r in cls) + " | "
                         + " | ".join(f"{r['error_ml']:+.1f} ({r['abs_error_ml']:.1f})" for r in cls) + " | "
                         + ", ".join(f"{r['missed']} / {r['extra']}" for r in cls) + " |")
    lines.append("\nLevels: the reference's slices from base to apex in three equal runs (slices beyond it go to "
                 "the nearer end). Dice pooled over a level's slices per volume, averaged over the volumes where "
                 "either mask has the structure there; error: predicted − reference volume on those slices; a slice is "
                 "missed (extra) where the reference (prediction) draws a structure and the other under a tenth of "
                 "its area.")
    return "\n".join(lines + _missed_slices(records, top))


def _missed_slices(records: list[dict], top: int) -> list[str]:
    """Lines naming the ``top`` largest slices missed whole (the reference's voxels there), if any."""
    missed = sorted(((px, r.get("split", ""), r.get("patient", ""), r.get("phase", ""), r["class"], r["level"], k)
                     for r in records for k, px in r.get("missed_slices", ())), reverse=True)
    if not missed:
        return []
    cells = [f"{split} {patient} {phase} {name.upper()} slice {k} ({level}, {px} px)"
             for px, split, patient, phase, name, level, k in missed[:top]]
    more = f"; and {len(missed) - top} more" if len(missed) > top else ""
    return ["", f"Slices missed whole, largest first: {'; '.join(cells)}{more}."]


def level_plot(records: list[dict], out: Path) -> Path:
    """Bars of Dice per level (base, mid, apex) and class; one panel per split and phase (ED, ES)."""
    from raysegment.analysis.levels import LEVELS, level_summary

    plt = pyplot()
    splits = _splits_of(records)
    fig, axes = plt.subplots(2, len(splits), figsize=(4.5 * len(splits), 6), squeeze=False, sharey=True)
    x, lowest = np.arange(len(LEVELS)), 0.5
    for split, phase, rs in _split_phase_groups(records, ("ED", "ES")):
        rows = {(r["level"], r["class"]): r["dice"] for r in level_summary(rs)}
        lowest = min([lowest] + [math.floor(d * 10) / 10 for d in rows.values() if d == d])
        ax = axes[("ED", "ES").index(phase)][splits.index(split)]
        for i, (lab, name) in enumerate(((1, "rv"), (2, "myo"), (3, "lv"))):
            ax.bar(x + (i - 1) * 0.27, [rows.get((lev, name), np.nan) for lev in LEVELS], 0.27,
                   color=COLOURS[lab], label=name.upper())
        ax.set_xticks(x, LEVELS)
        ax.set_title(f"{split}, {phase}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylim(lowest, 1.0)  # the panels share it
    axes[0][0].set_ylabel("Dice")
    axes[1][0].set_ylabel("Dice")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=3, fontsize=8)
    return save_figure(fig, out, rect=(0, 0, 1, 0.95))  # room for the legend above the panels


# --------------------------------------------------------------------------- clinical agreement

CLINICAL_INDICES = ("lv_edv_ml", "lv_esv_ml", "lv_ef_pct", "rv_edv_ml", "rv_esv_ml", "rv_ef_pct", "lv_mass_g",
                    "myo_thickness_max_mm")


def clinical_records(volumes, masks: dict, patients: dict, basal_rv: dict | None = None) -> list[dict]:
    """One record per patient with ED and ES: its group and, per clinical index, ``pred_…`` from
    ``masks[(patient, phase)]`` (``basal_rv``: the basal ES check applied first; what it did is in the
    record) and ``ref_…`` from
    the reference labels (``patients``: the manifest's metadata: height, weight)."""
    from raysegment.analysis.basal import predicted_indices
    from raysegment.analysis.clinical import patient_indices

    unspaced = next((v for v in volumes if v.spacing is None), None)
    if unspaced is not None:
        raise ValueError(f"{unspaced.patient}: no spacing in the shards; re-run raysegment.data.prepare (info.csv / NIfTI headers)")
    records = []
    for ed, es, pred, basal in predicted_indices(volumes, masks, patients, basal_rv):
        meta = patients.get(ed.patient, {})
        ref = patient_indices(ed.label, es.label, ed.spacing, meta.get("height_cm"), meta.get("weight_kg"))
        records.append({"patient": ed.patient, "group": ed.group, **basal,
                        **{f"pred_{k}": x for k, x in pred.items()},
                        **{f"ref_{k}": x for k, x in ref.items()}})
    return records


def write_clinical_csv(records: list[dict], path: Path) -> Path:
    """``clinical.csv``: one row per ``clinical_records`` record (csv quotes what holds a comma); a
    column only some records have (a diagnosis given or withheld) is empty in the others."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in records for k in r)))
        writer.writeheader()
        writer.writerows(records)
    return path


def read_clinical_csv(path: Path) -> list[dict]:
    """The records of a ``clinical.csv`` (``write_clinical_csv``), ``pred_``/``ref_`` values as floats
    (empty: NaN); ValueError for a file that is not one."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "patient" not in rows[0] or not any(k.startswith("pred_") for k in rows[0]):
        raise ValueError(f"{path} is not the clinical.csv of `report clinical --out`")
    try:
        return [{k: (float(v or "nan") if k.startswith(("pred_", "ref_")) else v) for k, v in r.items()} for r in rows]
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def clinical_summary(records: list[dict], indices=CLINICAL_INDICES) -> dict[str, dict]:
    from raysegment.analysis.clinical import agreement

    return {k: agreement([r[f"pred_{k}"] for r in records], [r[f"ref_{k}"] for r in records]) for k in indices}


def clinical_table(summary: dict[str, dict], mae_ci: dict[str, tuple] | None = None,
                   bias_ci: dict[str, tuple] | None = None) -> str:
    """Markdown: per index, n, MAE, bias, 95 % limits of agreement and correlation (units in the name);
    with ``mae_ci`` / ``bias_ci`` (``analysis.paired.error_ci``) their 95 % CIs, patients resampled."""
    ci = " [95 % CI]"
    lines = [f"| index | n | MAE{ci if mae_ci else ''} | bias (ours − ref){ci if bias_ci else ''} | "
             "95 % limits of agreement | r |", "|---|---|---|---|---|---|"]
    for k, a in summary.items():
        mae = f"{a['mae']:.2f}" + (f" [{mae_ci[k][1]:.2f}, {mae_ci[k][2]:.2f}]" if mae_ci else "")
        bias = f"{a['bias']:+.2f}" + (f" [{bias_ci[k][1]:+.2f}, {bias_ci[k][2]:+.2f}]" if bias_ci else "")
        lines.append(f"| {k} | {a['n']} | {mae} | {bias} | {a['loa_low']:+.1f} … {a['loa_high']:+.1f} "
                     f"| {a['r']:.3f} |")
    return "\n".join(lines)


def bland_altman(records: list[dict], out: Path, indices=CLINICAL_INDICES) -> Path:
    """One Bland-Altman panel per index (difference against mean, bias and 95 % limits), coloured by group."""
    from raysegment.analysis.clinical import agreement

    plt = pyplot()
    cols = 4
    rows = -(-len(indices) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False)
    groups = sorted({r["group"] for r in records})
    colours = dict(zip(groups, plt.cm.tab10.colors))
    for ax, k in zip(axes.flat, indices):
        p = np.array([r[f"pred_{k}"] for r in records], float)
        q = np.array([r[f"ref_{k}"] for r in records], float)
        a = agreement(p, q)
        for g in groups:
            sel = np.array([r["group"] == g for r in records])
            ax.scatter(((p + q) / 2)[sel], (p - q)[sel], s=12, color=colours[g], label=g)
        for y, style in ((a["bias"], "-"), (a["loa_low"], "--"), (a["loa_high"], "--")):
            ax.axhline(y, color="k", ls=style, lw=0.8)
        ax.axhline(0, color="0.6", lw=0.5)
        ax.set_title(f"{k}: bias {a['bias']:+.1f}, MAE {a['mae']:.1f}", fontsize=9)
        ax.set_xlabel("mean of ours and reference", fontsize=8)
        ax.set_ylabel("ours − reference", fontsize=8)
    for ax in list(axes.flat)[len(indices):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return save_figure(fig, out)
