"""What the soak checks once the chaos is over: every good study segmented exactly once with the mask
an undisturbed run makes, every bad one settled once with its reason, no error left, no temporary
file left, a results table that agrees with the ledger; and memory after 50 studies against the end.

Imports ``soak.corpus`` and ``inference``; not ``cli``.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

from raysegment.soak.corpus import Study

SETTLED = ("done", "failed", "skipped")


def study_key(study: Study, input_dir: Path, series: list[str]) -> str:
    """The ledger key the batch job gives a study: the absolute path of its NIfTI file (as the job
    resolves it; a looping symlink keeps its own path) or ``dicom:STUDY/SERIES``."""
    if series:
        return f"dicom:{series[0]}"
    folder = input_dir / study.folder
    if study.kind == "official":
        path = next(folder.glob("patient*/patient*_frame01.nii.gz"))
    else:
        path = folder / f"study{study.number:04d}.nii.gz"
    try:
        return str(path.resolve(strict=True))
    except (OSError, RuntimeError):
        return str(path.absolute())


def read_ledger(output: Path) -> list[dict]:
    """Every entry of a ledger, torn lines skipped (what ``Ledger`` keeps)."""
    entries = []
    path = output / "ledger.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def check_outcomes(studies: list[Study], series: dict[int, list[str]], input_dir: Path, chaos: Path,
                   reference: Path) -> dict:
    """Counts of what went wrong (each 0 in a passing soak), with the first few cases named."""
    by_key: dict[str, list[dict]] = defaultdict(list)
    for e in read_ledger(chaos):
        by_key[e["path"]].append(e)
    ref = {e["path"]: e for e in read_ledger(reference) if e["status"] == "done"}
    counts = {"lost": 0, "duplicated": 0, "wrong_outcomes": 0, "wrong_masks": 0, "errors_left": 0}
    cases: list[str] = []
    for s in studies:
        key = study_key(s, input_dir, series.get(s.number, []))
        entries = by_key.get(key, [])
        settled = [e for e in entries if e["status"] in SETTLED]
        problem = _problem(s, entries, settled, ref.get(key))
        if problem:
            counts[problem[0]] += 1
            cases.append(f"{s.folder} ({s.kind}): {problem[1]}")
    return {**counts, "cases": cases[:20]}


def _problem(s: Study, entries: list[dict], settled: list[dict], reference: dict | None) -> tuple[str, str] | None:
    if entries and entries[-1]["status"] == "error":
        return "errors_left", entries[-1]["reason"][:200]
    if not settled:
        return "lost", "never settled"
    if len(settled) > 1:
        return "duplicated", f"settled {len(settled)} times ({[e['status'] for e in settled]})"
    e = settled[0]
    if e["status"] != s.status or s.reason not in e["reason"] or (s.bad and not e["reason"] and s.status != "done"):
        return "wrong_outcomes", f"{e['status']}: {e['reason'][:200]} (expected {s.status}: {s.reason})"
    if s.kind == "gt_wrong_shape" and not any("gt_ignored_shape" in r.get("qc_flags", "") for r in e["rows"]):
        return "wrong_outcomes", "wrong-shaped ground truth not flagged"
    if e["status"] == "done":
        return _mask_problem(e, reference)
    return None


def _mask_problem(entry: dict, reference: dict | None) -> tuple[str, str] | None:
    """The chaos run's mask (and SEGs) against the undisturbed run's, byte for byte."""
    if reference is None:
        return "wrong_masks", "the undisturbed run has no mask to compare with"
    mine, theirs = Path(entry["rows"][0]["mask"]), Path(reference["rows"][0]["mask"])
    if not mine.is_file() or mine.read_bytes() != theirs.read_bytes():
        return "wrong_masks", f"{mine.name} differs from the undisturbed run's"
    segs = [Path(r["seg"]) for r in entry["rows"] if r.get("seg")]
    if any("seg" in r for r in entry["rows"]) and (len(segs) != len(entry["rows"]) or not all(p.is_file() for p in segs)):
        return "wrong_masks", f"{len(segs)} SEG files for {len(entry['rows'])} frames"
    return None


def leftovers(output: Path) -> list[str]:
    """Temporary files a killed writer left behind (``atomic_write``'s ``.partial-*``)."""
    return sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.name.startswith(".partial-"))


def results_agree(output: Path) -> bool:
    """``results.csv`` holds exactly the rows the ledger's latest entries give (study, frame)."""
    from raysegment.inference.ledger import Ledger, results_rows

    with open(output / "results.csv", newline="") as f:
        table = {(r["study"], r["frame"]) for r in csv.DictReader(f)}
    expected = {(str(r["study"]), str(r.get("frame", ""))) for r in results_rows(Ledger(output / "ledger.jsonl"))}
    return table == expected


def memory(samples: list, after: int = 50) -> dict:
    """Peak actor and driver RSS (MB) at the first sample with ``after`` studies settled and at the
    last sample of the run (``samples``: (settled, driver MB, {actor pid: MB}))."""
    live = [s for s in samples if s[2]]
    if not live:
        return {}
    first = next((s for s in live if s[0] >= after), live[-1])
    last = live[-1]
    return {"rss_mb_after_50": round(max(first[2].values()), 1), "rss_mb_final": round(max(last[2].values()), 1),
            "rss_mb_peak": round(max(max(s[2].values()) for s in live), 1),
            "driver_rss_mb_after_50": round(first[1], 1), "driver_rss_mb_final": round(last[1], 1),
            "settled_at_first_sample": first[0], "settled_at_last_sample": last[0],
            "rss_curve": _curve(live)}


def _curve(live: list, step: int = 25) -> list[list[float]]:
    """[settled studies, peak actor MB] about every ``step`` studies: the shape of the memory over the run."""
    out, next_at = [], 0
    for settled, _, actors in live:
        if settled >= next_at:
            out.append([settled, round(max(actors.values()), 1)])
            next_at = settled + step
    return out
