"""Costs that grow with an archive's history.

``bench poll``: seconds of a scheduled poll that finds nothing new, as the archive grows. A folder
(e.g. the official ACDC release's ``training``) is segmented once by ``raysegment.inference.batch``;
then N−1 copies of it (input and masks hard-linked, or copied across filesystems; ledger entries
re-pathed) stand for an archive N times as large that earlier runs settled, and two polls of it are
timed: the first with the copies' file hashes and patient indices not cached yet, the second as
every later cron poll.

``bench ledger``: a ledger of N segmented cine series (30 frame rows each, as the PACS path writes
them): seconds to read it whole (what each scheduled run does once, and what the service's
``GET /v1/pacs/series`` did per request) and to refresh a reader after one more series (what that
request does now).

Top layer (no stage imports it): imports ``cli.args``, ``inference``, ``config`` and ``runtime``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def _link_tree(src: Path, dst: Path) -> int:
    """Hard-link every file under ``src`` to the same place under ``dst`` (copy it where a link cannot
    be made: ``src`` on another filesystem than the temporary folder) → files placed."""
    n = 0
    for p in src.rglob("*"):
        if p.is_file():
            target = dst / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, target)
            except OSError:
                shutil.copy2(p, target)
            n += 1
    return n


def _copy_settled(ins: Path, out: Path, copies: int) -> None:
    """Copies 1 … ``copies``−1 of ``ins/copy0000`` and of its masks, with ledger entries as if each had been
    segmented like copy 0 (same content hashes, so the same model output)."""
    ledger = out / "ledger.jsonl"
    lines = ledger.read_text().splitlines()
    masks = {r["mask"] for line in lines for r in json.loads(line)["rows"] if r.get("mask")}
    first, mask_dir = str(ins / "copy0000") + "/", str(out / "masks") + "/"
    with open(ledger, "a") as f:
        for c in range(1, copies):
            name = f"copy{c:04d}"
            _link_tree(ins / "copy0000", ins / name)
            (out / "masks" / name).mkdir(parents=True)
            for m in masks:
                os.link(m, out / "masks" / name / Path(m).name)
            for line in lines:
                f.write(line.replace(first, f"{ins / name}/").replace(mask_dir, f"{out / 'masks' / name}/") + "\n")


def bench_poll(args) -> dict:
    """Seconds of the first segmentation of ``args.input`` and of two settled polls of ``args.copies`` copies."""
    from raysegment.cli.args import diagnosis_ref
    from raysegment.config import InferConfig
    from raysegment.inference.batch import run_batch
    from raysegment.runtime import ensure_ray

    source = Path(args.input)
    with tempfile.TemporaryDirectory(prefix="rs-bench-poll-") as tmp:
        ins, out = Path(tmp) / "in", Path(tmp) / "out"
        files = _link_tree(source, ins / "copy0000")
        diagnosis = diagnosis_ref(args.diagnosis)
        config = InferConfig(models=(args.model,), input=str(ins), output=str(out), diagnosis=diagnosis,
                             exclude=tuple(args.exclude), progress=False)
        ensure_ray()  # not counted: a cron poll's process starts it only when there is work
        t0 = time.perf_counter()
        once = run_batch(config)
        segment_s = time.perf_counter() - t0
        _copy_settled(ins, out, args.copies)
        polls = []
        for _ in range(2):
            t0 = time.perf_counter()
            summary = run_batch(config)
            polls.append(round(time.perf_counter() - t0, 2))
            if summary["segmented"] or summary["failed"] or summary["errors"]:
                raise RuntimeError(f"a poll of the settled copies did work: {summary}")
    return {"model": args.model, "diagnosis": args.diagnosis, "input_files": files, "copies": args.copies,
            "studies": summary["studies"], "studies_per_copy": once["studies"], "segment_once_s": round(segment_s, 2),
            "first_poll_s": polls[0], "poll_s": polls[1]}


def _series_entry(n: int, frames: int) -> dict:
    """A ledger entry as ``inference.study.segment_series`` and the PACS store write it (plausible values)."""
    key = f"dicom:1.2.826.0.1.3680043.8.498.{n}/1.2.826.0.1.3680043.8.498.{n}.1"
    common = {"study": key, "phase": "", "mask": f"/data/seg/masks/{key[-40:]}_seg.nii.gz",
              "model_uri": "models:/raysegment-densenet121@champion",
              "model_version": "raysegment-densenet121/7", "status": "done", "reason": "", "in_plane": "as-stored",
              "series_description": "SA cine retro", "patient_id": f"P{n:08d}", "height_cm": 178.0, "weight_kg": 81.5,
              "spacing_mm": "[10.0, 1.3672, 1.3672]", "qc_flags": "", "stored": True}
    rows = [common | {"frame": t, "seg": f"/data/seg/dicom/{n}/seg_frame{t + 1:02d}.dcm",
                      **{f"voxels_{c}": 5000 + 37 * t for c in ("rv", "myo", "lv")},
                      **{f"volume_{c}_ml": 97.198486328125 + t for c in ("rv", "myo", "lv")},
                      "lv_myo_mass_g": 173.59743118286133, "ef_lv_pct": 61.23456789, "ef_rv_pct": 52.3456789}
            for t in range(frames)]
    return {"path": key, "sha256": f"{n:064x}", "model_version": common["model_version"], "status": "done", "reason": "",
            "seconds": 4.2, "forward_seconds": 3.1, "rows": rows, "finished": "2026-12-07T15:00:00"}


def bench_ledger(args) -> dict:
    """Seconds to read a ledger of ``args.series`` cine series whole, and to refresh a reader after one more."""
    from raysegment.inference.ledger import Ledger

    with tempfile.TemporaryDirectory(prefix="rs-bench-ledger-") as tmp:
        path = Path(tmp) / "ledger.jsonl"
        with open(path, "w") as f:
            for n in range(args.series):
                f.write(json.dumps(_series_entry(n, args.frames)) + "\n")
        t0 = time.perf_counter()
        reader = Ledger(path)
        whole_s = time.perf_counter() - t0
        Ledger(path).append(_series_entry(args.series, args.frames))  # another writer: the batch job, a push
        t0 = time.perf_counter()
        reader.refresh()
        refresh_s = time.perf_counter() - t0
        if len(reader.entries) != args.series + 1:
            raise RuntimeError(f"the refreshed reader holds {len(reader.entries)} entries, not {args.series + 1}")
        return {"series": args.series, "frames": args.frames, "ledger_mb": round(path.stat().st_size / 2**20, 1),
                "read_whole_s": round(whole_s, 3), "refresh_s": round(refresh_s, 5)}


def ledger_line(out: dict) -> str:
    """``bench_ledger``'s figures in one line."""
    return (f"ledger of {out['series']} cine series × {out['frames']} frames ({out['ledger_mb']} MB): read whole "
            f"{out['read_whole_s']:.2f} s, a reader refreshed after one more series {out['refresh_s'] * 1000:.1f} ms")


def poll_line(out: dict) -> str:
    """``bench_poll``'s figures in one line."""
    return (f"{out['studies']} settled studies in {out['copies'] * out['input_files']} files ({out['copies']} copies of "
            f"{out['input_files']} files, {out['studies_per_copy']} studies; hard-linked copies of a DICOM series are one "
            f"series): first poll "
            f"{out['first_poll_s']:.1f} s (new copies' hashes and indices), then {out['poll_s']:.1f} s per poll "
            f"(segmenting one copy took {out['segment_once_s']:.1f} s)")


def add_poll_bench(sub) -> None:
    """The ``poll`` and ``ledger`` subcommands' arguments."""
    from raysegment.config import InferConfig, default_of

    p = sub.add_parser("poll", help="seconds of a cron poll that finds nothing new, for an archive N copies of --input")
    p.add_argument("--input", required=True, help="a study folder, e.g. the official ACDC release's training folder")
    p.add_argument("--model", default="shipped:densenet121")
    p.add_argument("--diagnosis", default=default_of(InferConfig, "diagnosis"),
                   help="as infer's --diagnosis ('none': no patient diagnosis)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="as infer's --exclude")
    p.add_argument("--copies", type=int, default=20, help="copies of --input the settled archive holds")
    g = sub.add_parser("ledger", help="seconds to read a ledger of N cine series whole, and to refresh a reader")
    g.add_argument("--series", type=int, default=4000, help="segmented cine series in the ledger (4000: a year of a busy scanner)")
    g.add_argument("--frames", type=int, default=30, help="frame rows per series")
