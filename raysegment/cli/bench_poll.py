"""``bench poll``: seconds of a scheduled poll that finds nothing new, as the archive grows. A folder
(e.g. the official ACDC release's ``training``) is segmented once by ``raysegment.inference.batch``;
then N−1 copies of it (input and masks hard-linked, ledger entries re-pathed) stand for an archive
N times as large that earlier runs settled, and two polls of it are timed: the first with the
copies' file hashes and patient indices not cached yet, the second as every later cron poll.

Top layer (no stage imports it): imports ``inference``, ``io``, ``config`` and ``runtime``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path


def _link_tree(src: Path, dst: Path) -> int:
    """Hard-link every file under ``src`` to the same place under ``dst`` → files linked."""
    n = 0
    for p in src.rglob("*"):
        if p.is_file():
            target = dst / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(p, target)
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
    from raysegment.config import InferConfig
    from raysegment.inference.batch import run_batch
    from raysegment.runtime import ensure_ray

    source = Path(args.input)
    with tempfile.TemporaryDirectory(prefix="rs-bench-poll-") as tmp:
        ins, out = Path(tmp) / "in", Path(tmp) / "out"
        files = _link_tree(source, ins / "copy0000")
        diagnosis = None if args.diagnosis == "none" else args.diagnosis
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


def poll_line(out: dict) -> str:
    """``bench_poll``'s figures in one line."""
    return (f"{out['studies']} settled studies ({out['copies']} copies of {out['studies_per_copy']}): first poll "
            f"{out['first_poll_s']:.1f} s (new copies' hashes and indices), then {out['poll_s']:.1f} s per poll "
            f"(segmenting one copy took {out['segment_once_s']:.1f} s)")


def add_poll_bench(sub) -> None:
    """The ``poll`` subcommand's arguments."""
    from raysegment.config import InferConfig, default_of

    p = sub.add_parser("poll", help="seconds of a cron poll that finds nothing new, for an archive N copies of --input")
    p.add_argument("--input", required=True, help="a study folder, e.g. the official ACDC release's training folder")
    p.add_argument("--model", default="shipped:densenet121")
    p.add_argument("--diagnosis", default=default_of(InferConfig, "diagnosis"),
                   help="as infer's --diagnosis ('none': no patient diagnosis)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="as infer's --exclude")
    p.add_argument("--copies", type=int, default=20, help="copies of --input the settled archive holds")
