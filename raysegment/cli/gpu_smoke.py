"""``python -m raysegment.bench gpu-smoke``: a ten-minute check of a GPU node (benchmarks, training and
its resume, GPU vs CPU inference) run as subprocesses with a time limit each.

Top layer (no stage imports it): imports ``training``, ``model``, ``data`` and ``io``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from raysegment.model.unet import BACKBONES

SMOKE_BATCHES = (8, 64)  # the default batch and a large one


def smoke_plan(out: Path, shards: Path, studies: Path) -> list[tuple[str, list[str]]]:
    """(step, command) of the GPU smoke test, in order: every step is one of raysegment's CLIs."""
    py = [sys.executable, "-m"]
    plan = [(f"bench train {b} batch {n}", py + ["raysegment.bench", "train", "--data", str(shards), "--backbone", b,
                                                 "--batch-size", str(n), "--steps", "30", "--gpu"])
            for b in BACKBONES for n in SMOKE_BATCHES]
    run = ["--data", str(shards), "--gpu", "--storage", str(out / "runs"), "--name", "smoke", "--cpus-per-worker", "1"]
    plan += [("train 1 epoch", py + ["raysegment.train", *run, "--epochs", "1"]),
             ("resume it for a 2nd epoch", py + ["raysegment.train", *run, "--epochs", "2"])]
    infer = ["raysegment.infer", "--model", "shipped:mobilenet_v2", "--input", str(studies), "--report-figures", "0"]
    plan += [("infer on the GPU", py + infer + ["--output", str(out / "infer-gpu"), "--gpu"]),
             ("infer on the CPU", py + infer + ["--output", str(out / "infer-cpu")])]
    return plan


def mask_agreement(a: Path, b: Path) -> float:
    """Share of voxels with equal labels in the same-named masks of two ``infer`` outputs."""
    import nibabel as nib

    equal = total = 0
    for path in sorted((a / "masks").glob("*.nii.gz")):
        x, y = np.asarray(nib.load(str(path)).dataobj), np.asarray(nib.load(str(b / "masks" / path.name)).dataobj)
        equal += int((x == y).sum())
        total += x.size
    if not total:
        raise ValueError(f"no masks in {a / 'masks'}")
    return equal / total


def gpu_smoke(args) -> dict:
    """Run (or with ``--dry-run`` print) the GPU smoke test; its summary goes to OUT/gpu-smoke.json and .md."""
    import subprocess

    from raysegment.data.dataset import load_volumes
    from raysegment.data.prepare import sample_shards
    from raysegment.training.train import resumed_line

    out = Path(args.out).resolve()
    shards, studies = out / "sample-shards", out / "studies"
    plan = smoke_plan(out, shards, studies)
    if args.dry_run:
        print(f"# raysegment GPU smoke test (dry run): bundled sample → {shards}, its volumes as NIfTI → {studies}")
        for i, (what, cmd) in enumerate(plan, 1):
            print(f"{i}. {what}: {' '.join(cmd[1:])}")
        return {"dry_run": True, "steps": [what for what, _ in plan]}
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here (run with --dry-run to see the plan)")
    out.mkdir(parents=True, exist_ok=True)
    sample_shards(shards)
    if not studies.exists():
        write_studies(load_volumes(shards, "val") + load_volumes(shards, "train")[:4], studies)
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip()
    summary = {"device": torch.cuda.get_device_name(0), "driver": driver, "cuda": torch.version.cuda,
               "torch": torch.__version__, "bf16": torch.cuda.is_bf16_supported(), "steps": []}
    logs = {}
    for what, cmd in plan:
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.step_timeout)
        logs[what] = r.stdout + r.stderr
        (out / "logs").mkdir(exist_ok=True)
        (out / "logs" / (what.replace(" ", "_") + ".log")).write_text(logs[what])
        step = {"step": what, "ok": r.returncode == 0, "seconds": round(time.perf_counter() - t0, 1)}
        if what.startswith("bench train") and r.returncode == 0:
            step.update(json.loads(next(line for line in r.stdout.splitlines() if line.startswith("{"))))
            step.pop("ray_epochs", None)
        summary["steps"].append(step)
        print(f"[raysegment] smoke: {what}: {'ok' if step['ok'] else 'FAILED'} ({step['seconds']} s)", flush=True)
    summary["resumed"] = resumed_line(1) in logs["resume it for a 2nd epoch"]
    try:
        summary["gpu_cpu_mask_agreement"] = mask_agreement(out / "infer-gpu", out / "infer-cpu")
    except (OSError, ValueError) as exc:
        summary["gpu_cpu_mask_agreement"] = None
        summary["agreement_error"] = str(exc)
    summary["passed"] = (all(s["ok"] for s in summary["steps"]) and summary["resumed"]
                         and (summary["gpu_cpu_mask_agreement"] or 0) >= 0.999)
    (out / "gpu-smoke.json").write_text(json.dumps(summary, indent=2))
    (out / "gpu-smoke.md").write_text(smoke_markdown(summary))
    return summary


def smoke_markdown(summary: dict) -> str:
    lines = [f"# GPU smoke test: {'PASSED' if summary['passed'] else 'FAILED'}", "",
             f"{summary['device']}, driver {summary['driver']}, CUDA {summary['cuda']}, torch {summary['torch']}, "
             f"bf16 {summary['bf16']}", "",
             "| step | ok | s | bare slices/s | Ray Train slices/s | ratio | peak MiB | GPU busy |", "|---|---|---|---|---|---|---|---|"]
    for s in summary["steps"]:
        lines.append(f"| {s['step']} | {s['ok']} | {s['seconds']} | {s.get('bare_slices_per_s', '')} | "
                     f"{s.get('ray_slices_per_s', '')} | {s.get('ratio', '')} | {s.get('peak_mem_mib', '')} | "
                     f"{s.get('gpu_busy_share', '')} |")
    lines += ["", f"Resumed from the first run's checkpoint: {summary['resumed']}. GPU vs CPU masks: "
              f"{summary['gpu_cpu_mask_agreement']} of voxels equal (needs ≥ 0.999)."]
    return "\n".join(lines) + "\n"


def write_studies(volumes, folder: Path, spacing_zyx=(10.0, 1.5625, 1.5625)) -> list[Path]:
    """Shard volumes as int16 NIfTI studies (as scanners export them), no ground truth beside them."""
    import nibabel as nib

    from raysegment.io.studies import zyx_to_nifti

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    affine = np.diag([spacing_zyx[2], spacing_zyx[1], spacing_zyx[0], 1.0])
    for v in volumes:
        img = nib.Nifti1Image(zyx_to_nifti(np.round(v.image * 1000).astype(np.int16)), affine)
        img.header.set_zooms(tuple(spacing_zyx[::-1]))
        path = folder / f"{v.patient}_{v.phase}.nii.gz"
        nib.save(img, str(path))
        paths.append(path)
    return paths
