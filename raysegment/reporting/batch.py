"""The batch job's ``report.md``: mean Dice against reference masks where there are any, a table of
the study frames, the patients' indices and diagnoses, and the overlays the actors drew.

Imports ``analysis``, ``io`` and ``config``; nothing above ``reporting``.
"""

from __future__ import annotations

import time
from pathlib import Path

from raysegment.io.files import atomic_write

MAX_TABLE_ROWS = 1000  # frames (patients) a table lists before it lists only the failed and flagged ones
MAX_NAMED = 20  # folders a sentence names before it gives their count


def _cell(text) -> str:
    """A markdown table cell: one line, no column breaks."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _capped(items: list, problem, what: str, whose: str) -> tuple[list, list[str]]:
    """An archive's every frame or patient, rewritten at each poll, is read by no one; its problems
    are. → (the items a table lists: all up to ``MAX_TABLE_ROWS``, else the first of those ``problem``
    holds for; the lines that say so)."""
    if len(items) <= MAX_TABLE_ROWS:
        return items, []
    problems = [i for i in items if problem(i)]
    shown = problems[:MAX_TABLE_ROWS]
    count = f"the first {len(shown)} of {len(problems)}" if len(shown) < len(problems) else str(len(problems))
    return shown, [f"{len(items)} {what}, more than the {MAX_TABLE_ROWS} this table lists: it lists {whose} ({count}). "
                   f"Every one is in `results.csv`.", ""]


def _patients_section(rows: list[dict]) -> list[str]:
    """The report's per-patient table (ED + ES indices, diagnosis, patient QC flags) and the
    official-layout folders that got no indices, with why."""
    from raysegment.analysis.clinical import PATIENT_FLAGS, ed_es_pairs, unpaired_patients

    # A patient folder by its name, a cine study (DICOM series, 4-D NIfTI) by its own.
    patients = {key: p["ED"] for key, p in ed_es_pairs(rows).items() if "lv_ef_pct" in p["ED"]}
    missing = unpaired_patients(rows)
    if not patients and not missing:
        return []
    lines = ["", "## Patients (ED + ES)", ""]
    listed, note = _capped(sorted(patients.items()), lambda p: p[1].get("patient_qc_flags") or p[1].get("diagnosis_withheld"),
                           "patients", "those with a QC flag or a withheld diagnosis")
    lines += note
    if patients:
        lines += ["| patient | LV EDV mL | LV EF % | RV EDV mL | RV EF % | LV mass g | max wall mm | diagnosis (p) | reference | QC |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
    for folder, r in listed:
        diag = f"{r['diagnosis']} ({r['p_' + r['diagnosis']]:.2f})" if r.get("diagnosis") else \
            f"withheld ({r['diagnosis_withheld']})" if r.get("diagnosis_withheld") else ""
        name = Path(folder).name  # a DICOM series: its patient ID and description, then the series UID's end
        if r.get("patient_id"):
            name = f"{r['patient_id']} {r.get('series_description', '')} (series …{name[-8:]})"
        lines.append(f"| {_cell(name)} | {r['lv_edv_ml']:.1f} | {r['lv_ef_pct']:.1f} | {r['rv_edv_ml']:.1f} "
                     f"| {r['rv_ef_pct']:.1f} | {r['lv_mass_g']:.1f} | {r['myo_thickness_max_mm']:.1f} | {diag} "
                     f"| {r.get('group_reference', '')} | {r.get('patient_qc_flags', '')} |")
    if shown := sorted({f for r in patients.values() for f in (r.get("patient_qc_flags") or "").split(";") if f}):
        lines += ["", "QC: " + "; ".join(f"`{f}`: {PATIENT_FLAGS.get(f, '')}" for f in shown) + "."]
    if missing:
        named = [f"{Path(f).name} ({why})" for f, why in sorted(missing.items())]
        more = f"; and {len(named) - MAX_NAMED} more (their rows in results.csv have no lv_ef_pct)" \
            if len(named) > MAX_NAMED else ""
        lines += ["", f"No patient indices for {len(named)} folder{'s' if len(named) > 1 else ''}: "
                  + "; ".join(named[:MAX_NAMED]) + more + "."]
    return lines


def batch_report(rows: list[dict], out: Path, n_figures: int) -> Path:
    """``out/report.md`` for a batch: a table of its study frames (beyond ``MAX_TABLE_ROWS`` of them, of
    the failed and QC-flagged ones), the patients and
    the overlay PNGs the actors drew (``overlay_thumbnail``; RV red, MYO green, LV blue), at most
    ``n_figures``, flagged studies first. Draws nothing itself."""
    from raysegment.analysis.levels import rows_level_dice
    from raysegment.analysis.metrics import rows_dice_summary

    lines = ["# raysegment batch report", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    scored = rows_dice_summary(rows)
    if scored:
        lines += [f"Against the reference masks (`_gt` files, nnU-Net's `labelsXx`) of {scored['volumes']} study frames, "
                  f"mean 3-D Dice: RV {scored['dice_rv']:.3f}, "
                  f"MYO {scored['dice_myo']:.3f}, LV {scored['dice_lv']:.3f} (mean {scored['dice_mean']:.3f}).", ""]
    turned = sorted({Path(r["study"]).name for r in rows if r.get("in_plane") not in (None, "", "as-stored")})
    if turned:  # --in-plane auto chose another orientation than the stored one for these
        count = f"{len(turned)} stud{'y' if len(turned) == 1 else 'ies'}"
        names = ", ".join(_cell(t) for t in turned[:10]) + (", …" if len(turned) > 10 else "")
        lines += [f"Segmented in another in-plane orientation than stored ({count}; results' `in_plane` column): {names}.", ""]
    by_level = rows_level_dice(rows)
    if by_level:
        lines += ["By level of the heart (the reference's slices from base to apex in three equal runs), mean Dice "
                  "RV / MYO / LV: " + "; ".join(f"{level} " + " / ".join(f"{d:.3f}" for d in dice.values())
                                                 for level, dice in by_level.items()) + ".", ""]
    shown, note = _capped(rows, lambda r: r.get("status") != "done" or r.get("qc_flags"), "study frames",
                          "the failed and flagged ones")
    lines += note
    lines += ["| study | frame | phase | status | RV mL | MYO mL | LV mL | LV EF % | Dice RV/MYO/LV | QC |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in shown:
        if r.get("status") != "done":
            why = f"{r.get('status', 'failed')}: {_cell(r.get('reason', ''))}"
            lines.append(f"| {_cell(Path(r['study']).name)} | - | | {why} | | | | | | |")
            continue
        dice = "/".join(f"{r[f'dice_{c}']:.3f}" for c in ("rv", "myo", "lv")) if r.get("dice_lv") is not None else ""
        ef = r.get("ef_lv_pct")
        lines.append(f"| {_cell(Path(r['study']).name)} | {r['frame']} | {r.get('phase') or ''} | done | {r['volume_rv_ml']:.1f} "
                     f"| {r['volume_myo_ml']:.1f} "
                     f"| {r['volume_lv_ml']:.1f} | {'' if ef is None else f'{ef:.1f}'} | {dice} | {r.get('qc_flags', '')} |")
    lines += _patients_section(rows)
    # The actor drew overlays of the batch's first studies and of every flagged one: flagged first.
    firsts = sorted((r for r in rows if r.get("status") == "done" and r["frame"] == 0), key=lambda r: not r.get("qc_flags"))
    figs = [Path(r["figure"]) for r in firsts if r.get("figure") and Path(r["figure"]).exists()][:n_figures]
    lines += ["", f"## Overlays ({len(figs)} of {len(firsts)} studies)", ""]
    lines += [f"![{p.stem}](figures/{p.name})" for p in figs]
    path = out / "report.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return path
