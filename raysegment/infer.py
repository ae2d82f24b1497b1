"""Batch inference over new studies with a registered (or local) model, resumable and idempotent.

    python -m raysegment.infer --model models:/raysegment-mobilenet_v2@champion \\
        --input /data/new_studies --output /data/segmentations --mlflow-uri http://127.0.0.1:5000

A study is one NIfTI file (3-D, or 4-D with every frame segmented); files ending ``_gt`` are
ground truth, used for Dice/HD95 when present. Outputs per study: a uint8 mask NIfTI with the
input's affine and grid (``OUTPUT/masks/<name>_seg.nii.gz``). Per batch: ``results.parquet``
and ``results.csv`` (one row per study frame), ``ledger.jsonl`` (one line per study: path,
content hash, model version, status) and ``report.md`` with overlay PNGs.

A study whose (content hash, model version) is in the ledger is skipped; a killed run resumes
where it stopped. A bad study is recorded as failed with its reason and does not stop the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from raysegment import CLASS_NAMES, disable_telemetry
from raysegment.weights import sha256

MYOCARDIUM_DENSITY_G_PER_ML = 1.05
# QC bounds (mL) for a single cavity or myocardium of an adult heart; outside is implausible.
PLAUSIBLE_ML = (2.0, 500.0)


@dataclass(frozen=True)
class InferConfig:
    model: str  # models:/NAME@ALIAS, models:/NAME/VERSION, a checkpoint folder, or a .safetensors file
    input: str
    output: str
    tracking_uri: str | None = None
    flip_tta: bool = False
    batch_size: int = 16  # slices per forward pass
    actors: int = 1
    cpus_per_actor: float = 1.0
    threads: int | None = None
    report_slices: int = 3
    limit: int | None = None  # process at most this many new studies (then stop)
    progress: bool = True


# --------------------------------------------------------------------------- studies


def find_studies(root: str | Path) -> list[Path]:
    """Every ``*.nii``/``*.nii.gz`` under ``root`` that is not ground truth (``*_gt``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder does not exist")
    files = [p for p in root.rglob("*") if p.is_file() and (p.name.endswith(".nii.gz") or p.name.endswith(".nii"))]
    return sorted(p for p in files if not _stem(p).endswith("_gt"))


def _stem(path: Path) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", path.name)


def gt_for(path: Path) -> Path | None:
    for ext in (".nii.gz", ".nii"):
        cand = path.with_name(_stem(path) + "_gt" + ext)
        if cand.is_file():
            return cand
    return None


def acdc_phase(path: Path) -> str | None:
    """'ED'/'ES' for an official-layout frame named in its folder's Info.cfg, else None."""
    m = re.match(r"^(patient\d{3})_frame(\d+)$", _stem(path))
    info = path.parent / "Info.cfg"
    if not m or not info.is_file():
        return None
    values = dict(line.split(":", 1) for line in info.read_text().splitlines() if ":" in line)
    frame = int(m.group(2))
    for phase in ("ED", "ES"):
        if values.get(phase, "").strip().isdigit() and int(values[phase]) == frame:
            return phase
    return None


# --------------------------------------------------------------------------- model loading


def load_model(model: str, tracking_uri: str | None = None):
    """(torch model, TrainConfig, model version string) from a registry URI or a local file."""
    from raysegment.train import load_checkpoint_model

    version = model_version(model, tracking_uri)
    if model.startswith("models:/"):
        from raysegment.registry import load_registered

        net, config, _ = load_registered(model, tracking_uri)
        return net, config, version
    path = Path(model)
    if path.is_dir():
        net, config, _ = load_checkpoint_model(path)
        return net, config, version
    from raysegment.weights import load_weights_file

    net, config = load_weights_file(path)
    return net, config, version


def model_version(model: str, tracking_uri: str | None = None) -> str:
    """The version string results and the ledger key on: ``NAME/VERSION`` or ``file:NAME:HASH``."""
    if model.startswith("models:/"):
        from mlflow import MlflowClient

        name, _, ref = model[len("models:/"):].partition("@")
        if ref:
            return f"{name}/{MlflowClient(tracking_uri).get_model_version_by_alias(name, ref).version}"
        return model[len("models:/"):]
    path = Path(model)
    weights = path / "model.pt" if path.is_dir() else path
    if not weights.is_file() or not (path.is_dir() or path.suffix == ".safetensors"):
        raise FileNotFoundError(f"{model}: not a models:/ URI, a checkpoint folder (model.pt + config.json) "
                                f"or a .safetensors weights file")
    return f"file:{path.name}:{sha256(weights)[:12]}"


# --------------------------------------------------------------------------- one study


class StudyError(Exception):
    pass


def read_study(path: Path):
    """(nibabel image, data as (frames, z, y, x) float64, zooms (x, y, z) mm)."""
    import nibabel as nib

    if path.stat().st_size == 0:
        raise StudyError("empty file (0 bytes)")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float64)
    except Exception as exc:
        raise StudyError(f"unreadable NIfTI ({type(exc).__name__}: {exc})") from None
    if data.ndim == 3:
        frames = data[None]
    elif data.ndim == 4:
        frames = np.moveaxis(data, 3, 0)
    else:
        raise StudyError(f"expected a 3-D or 4-D volume, got {data.ndim}-D shape {data.shape}")
    if min(frames.shape[1:3]) < 8:
        raise StudyError(f"in-plane size {frames.shape[1:3]} too small for a short-axis image")
    if not np.all(np.isfinite(frames)):
        raise StudyError("image holds NaN or inf intensities")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return img, np.transpose(frames, (0, 3, 2, 1)), zooms


def _atomic_write_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder (so os.replace is atomic), same suffix (nibabel picks the format by it).
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix="".join(path.suffixes))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_mask(mask_fzyx: np.ndarray, ref_img, path: Path) -> None:
    """Write (frames, z, y, x) labels as uint8 NIfTI on exactly ``ref_img``'s grid and affine."""
    import nibabel as nib

    data = np.transpose(mask_fzyx, (3, 2, 1, 0))  # → (x, y, z, frames)
    if len(ref_img.shape) == 3:
        data = data[..., 0]
    header = ref_img.header.copy()
    header.set_data_dtype(np.uint8)
    out = nib.Nifti1Image(data.astype(np.uint8), ref_img.affine, header)
    out.set_qform(ref_img.get_qform(), code=int(ref_img.header["qform_code"]))
    out.set_sform(ref_img.get_sform(), code=int(ref_img.header["sform_code"]))
    out.header["scl_slope"], out.header["scl_inter"] = 1.0, 0.0
    _atomic_write_bytes(path, lambda tmp: nib.save(out, tmp))


def volumes_ml(mask_zyx: np.ndarray, zooms_xyz) -> dict:
    voxel_ml = float(np.prod(zooms_xyz)) / 1000.0
    return {name: float((mask_zyx == lab).sum()) * voxel_ml for lab, name in CLASS_NAMES.items()}


def segment_study(path: Path, model, config, model_uri: str, model_version: str, out_dir: Path,
                  flip_tta: bool, batch_size: int) -> list[dict]:
    """Segment one study file → result rows (one per frame). Raises StudyError on bad input."""
    import torch

    from raysegment.metrics import score_records
    from raysegment.models import predict_volume
    from raysegment.prepare import normalize_intensity

    img, frames, zooms = read_study(path)
    dtype = torch.bfloat16
    masks = np.stack([
        predict_volume(model, normalize_intensity(f), config.image_size, batch_size=batch_size,
                       autocast_dtype=dtype, flip_tta=flip_tta)
        for f in frames
    ])
    mask_path = out_dir / "masks" / f"{_mask_name(path)}"
    save_mask(masks, img, mask_path)

    gt = gt_for(path)
    gt_frames = None
    if gt is not None:
        try:
            _, g, _ = read_study(gt)
            gt_frames = g.astype(np.uint8) if g.shape == frames.shape else None
        except StudyError:
            gt_frames = None
    spacing_zyx = (zooms[2], zooms[1], zooms[0])
    rows = []
    phase = acdc_phase(path)
    for t, m in enumerate(masks):
        counts = {f"voxels_{n}": int((m == lab).sum()) for lab, n in CLASS_NAMES.items()}
        vols = volumes_ml(m, zooms)
        row = {"study": str(path), "frame": t, "phase": phase or "", "mask": str(mask_path),
               "model_uri": model_uri, "model_version": model_version, "status": "done", "reason": "",
               "spacing_mm": json.dumps([round(z, 4) for z in spacing_zyx]), **counts,
               **{f"volume_{n}_ml": vols[n] for n in CLASS_NAMES.values()},
               "lv_myo_mass_g": vols["myo"] * MYOCARDIUM_DENSITY_G_PER_ML}
        if gt_frames is not None:
            for rec in score_records(m, gt_frames[t], spacing_zyx):
                row[f"dice_{rec['class']}"] = rec["dice"]
                row[f"hd95_{rec['class']}_mm"] = rec["hd95"]
        rows.append(row)
    _add_ejection_fraction(rows)
    for row in rows:
        row["qc_flags"] = ";".join(_qc_flags(row))
    return rows


def _mask_name(path: Path) -> str:
    # Unique per input path: a short hash of the parent keeps same-named files apart.
    tag = hashlib.sha1(str(path.parent).encode()).hexdigest()[:6]
    return f"{_stem(path)}_{tag}_seg.nii.gz"


def _add_ejection_fraction(rows: list[dict]) -> None:
    """EF (%) for 4-D studies: ED = frame of largest LV volume, ES = smallest."""
    if len(rows) < 2:
        return
    for name in ("lv", "rv"):
        vols = [r[f"volume_{name}_ml"] for r in rows]
        edv, esv = max(vols), min(vols)
        ef = 100.0 * (edv - esv) / edv if edv > 0 else float("nan")
        for r in rows:
            r[f"ef_{name}_pct"] = ef


def add_patient_ef(table: list[dict]) -> None:
    """EF (%) for official-layout patients whose ED and ES frames were both segmented."""
    by_dir: dict[str, dict[str, dict]] = {}
    for r in table:
        if r.get("status") == "done" and r.get("phase") in ("ED", "ES"):
            by_dir.setdefault(str(Path(r["study"]).parent), {})[r["phase"]] = r
    for phases in by_dir.values():
        if set(phases) == {"ED", "ES"}:
            for name in ("lv", "rv"):
                edv, esv = phases["ED"][f"volume_{name}_ml"], phases["ES"][f"volume_{name}_ml"]
                ef = 100.0 * (edv - esv) / edv if edv > 0 else float("nan")
                phases["ED"][f"ef_{name}_pct"] = phases["ES"][f"ef_{name}_pct"] = ef


def _qc_flags(row: dict) -> list[str]:
    flags = []
    for name in CLASS_NAMES.values():
        if row[f"voxels_{name}"] == 0:
            flags.append(f"missing_{name}")
        elif not PLAUSIBLE_ML[0] <= row[f"volume_{name}_ml"] <= PLAUSIBLE_ML[1]:
            flags.append(f"implausible_volume_{name}")
    return flags


# --------------------------------------------------------------------------- Ray Data actors


class SegmentActor:
    """Ray Data actor: loads the model once, then segments one study per call."""

    def __init__(self, config: InferConfig):
        import torch

        disable_telemetry()
        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        self.model, self.train_config, self.version = load_model(config.model, config.tracking_uri)
        if config.flip_tta:
            from raysegment.train import check_flip_tta

            check_flip_tta(self.train_config)

    def __call__(self, batch: dict) -> dict:
        rows = []
        for path, digest in zip(batch["path"], batch["sha256"]):
            t0 = time.perf_counter()
            try:
                study_rows = segment_study(Path(path), self.model, self.train_config, self.config.model, self.version,
                                           Path(self.config.output), self.config.flip_tta, self.config.batch_size)
                status, reason = "done", ""
            except Exception as exc:  # a bad study never stops the batch
                study_rows = []
                status = "failed"
                reason = str(exc) if isinstance(exc, StudyError) else f"{type(exc).__name__}: {exc}"
            rows.append({"path": path, "sha256": digest, "model_version": self.version, "status": status,
                         "reason": reason, "seconds": time.perf_counter() - t0, "rows": json.dumps(study_rows)})
        return {k: np.asarray([r[k] for r in rows], dtype=object) for k in rows[0]}


# --------------------------------------------------------------------------- ledger


class Ledger:
    """Append-only JSONL of finished studies; the last line for a (path, hash, version) wins."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[tuple[str, str, str], dict] = {}
        if path.exists():
            good = []
            for line in path.read_text().splitlines():
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a killed run
                good.append(line)
                self.entries[(e["path"], e["sha256"], e["model_version"])] = e
            # Drop torn lines for good, so every line of the ledger stays valid JSON.
            _atomic_write_bytes(path, lambda tmp: Path(tmp).write_text("".join(g + "\n" for g in good)))

    def has(self, path: str, digest: str, version: str) -> bool:
        return (path, digest, version) in self.entries

    def append(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries[(entry["path"], entry["sha256"], entry["model_version"])] = entry


# --------------------------------------------------------------------------- the batch job


def run_batch(config: InferConfig) -> dict:
    """Segment every new study under ``config.input``; returns counts."""
    import ray

    from raysegment.train import ensure_ray

    disable_telemetry()
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(out / "ledger.jsonl")
    version = model_version(config.model, config.tracking_uri)
    if config.model.startswith("models:/"):
        # Pin the alias for the whole batch: actors load the version the ledger records.
        config = replace(config, model=f"models:/{version}")
    studies = find_studies(config.input)
    todo = []
    for p in studies:
        digest = sha256(p)
        if not ledger.has(str(p.resolve()), digest, version):
            todo.append({"path": str(p.resolve()), "sha256": digest})
    if config.limit is not None:
        todo = todo[: config.limit]
    print(f"[raysegment] {len(studies)} studies, {len(studies) - len(todo)} already done with {version}, "
          f"{len(todo)} to segment", flush=True)
    done = failed = 0
    if todo:
        ensure_ray()
        ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            SegmentActor, fn_constructor_kwargs={"config": config}, batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=config.actors), num_cpus=config.cpus_per_actor,
        )
        for i, row in enumerate(ds.iter_rows(), 1):
            entry = {k: row[k] for k in ("path", "sha256", "model_version", "status", "reason")}
            entry["seconds"] = float(row["seconds"])
            entry["rows"] = json.loads(row["rows"])
            entry["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            ledger.append(entry)
            done += entry["status"] == "done"
            failed += entry["status"] == "failed"
            if config.progress:
                what = "ok" if entry["status"] == "done" else f"FAILED: {entry['reason']}"
                print(f"[raysegment] {i}/{len(todo)} {Path(entry['path']).name} {what} ({entry['seconds']:.1f}s)",
                      flush=True)
    table = write_results(ledger, out)
    write_report(table, out, config.report_slices)
    return {"studies": len(studies), "segmented": done, "failed": failed, "skipped": len(studies) - len(todo),
            "version": version}


def results_rows(ledger: Ledger) -> list[dict]:
    rows = []
    for e in ledger.entries.values():
        if e["status"] == "done":
            rows.extend(e["rows"])
        else:
            rows.append({"study": e["path"], "frame": -1, "status": "failed", "reason": e["reason"],
                         "model_version": e["model_version"]})
    add_patient_ef(rows)
    return rows


def write_results(ledger: Ledger, out: Path) -> list[dict]:
    """Rewrite results.parquet/.csv from the ledger (atomically): one row per study frame."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rows = results_rows(ledger)
    if not rows:
        return rows
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("study", "frame", "status"), k))
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
    _atomic_write_bytes(out / "results.parquet", lambda tmp: pq.write_table(table, tmp))
    _atomic_write_bytes(out / "results.csv", lambda tmp: pacsv.write_csv(table, tmp))
    return rows


def write_report(rows: list[dict], out: Path, n_slices: int) -> None:
    """report.md: a table of the batch and overlay PNGs (RV red, MYO green, LV blue contours)."""
    from raysegment.report import overlay_png

    lines = ["# raysegment batch report", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.", "",
             "| study | frame | status | RV mL | MYO mL | LV mL | LV EF % | Dice RV/MYO/LV | QC |",
             "|---|---|---|---|---|---|---|---|---|"]
    figs = []
    for r in rows:
        if r.get("status") != "done":
            lines.append(f"| {Path(r['study']).name} | - | failed: {r.get('reason', '')} | | | | | | |")
            continue
        dice = "/".join(f"{r[f'dice_{c}']:.3f}" for c in ("rv", "myo", "lv")) if "dice_lv" in r and r["dice_lv"] is not None else ""
        ef = r.get("ef_lv_pct")
        lines.append(f"| {Path(r['study']).name} | {r['frame']} | done | {r['volume_rv_ml']:.1f} | {r['volume_myo_ml']:.1f} "
                     f"| {r['volume_lv_ml']:.1f} | {'' if ef is None else f'{ef:.1f}'} | {dice} | {r.get('qc_flags', '')} |")
        if r["frame"] == 0:
            png = out / "figures" / (Path(r["mask"]).name.replace(".nii.gz", ".png"))
            if not png.exists():
                try:
                    overlay_png(Path(r["study"]), Path(r["mask"]), png, n_slices)
                except Exception as exc:  # a figure must never fail the batch
                    print(f"[raysegment] no overlay for {r['study']}: {exc}", file=sys.stderr)
                    continue
            figs.append(png)
    lines += ["", "## Overlays", ""] + [f"![{p.stem}](figures/{p.name})" for p in figs]
    _atomic_write_bytes(out / "report.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m raysegment.infer`` command line (also used to dry-run job specs)."""
    p = argparse.ArgumentParser(prog="python -m raysegment.infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, checkpoint folder or .safetensors")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--mlflow-uri", default=None, help="tracking server of the registry (default: MLflow's own default)")
    p.add_argument("--flip-tta", action="store_true", help="average with the horizontally flipped prediction")
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=None, help="torch threads per actor")
    p.add_argument("--limit", type=int, default=None, help="segment at most N new studies this run")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    disable_telemetry()
    config = InferConfig(model=a.model, input=a.input, output=a.output, tracking_uri=a.mlflow_uri,
                         flip_tta=a.flip_tta, actors=a.actors, cpus_per_actor=a.cpus_per_actor,
                         threads=a.threads or max(1, (os.cpu_count() or 1) // a.actors), limit=a.limit)
    try:
        summary = run_batch(config)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[raysegment] done: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
