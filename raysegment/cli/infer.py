"""``python -m raysegment.infer``: the scheduled batch job's command line, a thin layer over
``raysegment.inference.batch``. Top layer: may import every stage."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raysegment.cli import INTERRUPTED, add_in_plane_argument, command_parser
from raysegment.cli.lost import cluster_gone, watch_cluster
from raysegment.config import PredictConfig, default_of
from raysegment.inference.batch import InferConfig, is_dicomweb, run_batch
from raysegment.io.dicomweb import PacsUnreachable
from raysegment.runtime import ClusterUnreachable, quiet_environment, stop_signal


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m raysegment.infer`` command line (also used to dry-run job specs)."""
    d = lambda name: default_of(InferConfig, name)  # noqa: E731
    pd = lambda name: default_of(PredictConfig, name)  # noqa: E731
    p = command_parser(
        "infer",
        "Segment the studies in --input — NIfTI or DICOM files in a folder, or a PACS over DICOMweb — into "
        "--output: masks, DICOM SEGs, clinical indices, results.csv and report.md. Each study is segmented "
        "once per model version (ledger.jsonl): a re-run, or one after Ctrl-C, does only what is left.",
        "python -m raysegment.infer --model shipped:densenet121 --diagnosis shipped --input /data/ACDC/testing "
        "--output /data/seg",
        "python -m raysegment.infer --model models:/raysegment-mobilenet_v2@champion --mlflow-uri http://mlflow:5000 "
        "--input http://pacs:8042/dicom-web --output /data/seg")
    p.add_argument("--model", required=True, action="append", dest="models",
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, checkpoint or run folder, .safetensors or "
                        "exported .onnx file, or shipped:BACKBONE; repeat it for an ensemble (members' softmax averaged)")
    p.add_argument("--input", required=True,
                   help="a folder (NIfTI studies and DICOM files, found by content) or a DICOMweb URL "
                        "(http://HOST:PORT/dicom-web): MR series found by QIDO-RS, SEGs stored back by STOW-RS")
    p.add_argument("--output", required=True, help="folder for masks, DICOM SEGs, results.csv, report.md and ledger.jsonl")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="folder input: leave out files whose path under --input, or name, matches GLOB; repeatable. "
                        "'*_4d.nii.gz' leaves out the official layout's 4-D cine files (every frame of the cine: 12–35 "
                        "in the 80 ACDC patients measured; the ED and ES frame files, what ACDC scores, stay)")
    p.add_argument("--mlflow-uri", default=d("tracking_uri"), help="tracking server of the registry (default: MLflow's own default)")
    p.add_argument("--flip-tta", action="store_true", help="average with the horizontally flipped prediction")
    p.add_argument("--batch-size", type=int, default=pd("batch_size"), help="slices per forward pass")
    p.add_argument("--precision", default=pd("precision"), choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--runtime", default=pd("runtime"), choices=["torch", "onnx"],
                   help="onnx: the networks run on ONNX Runtime (CPU, fp32), everything else unchanged")
    add_in_plane_argument(p)
    p.add_argument("--actors", type=int, default=d("actors"),
                   help="inference actors (default: as many as the cluster's free CPUs, or GPUs with --gpu, hold)")
    p.add_argument("--cpus-per-actor", type=float, default=d("cpus_per_actor"), help="CPUs Ray reserves per actor")
    p.add_argument("--gpus-per-actor", type=float, default=d("gpus_per_actor"),
                   help="GPU share per actor (e.g. 1, or 0.5 for two actors on one GPU); > 0 predicts on CUDA")
    p.add_argument("--gpu", action="store_const", const=1.0, dest="gpus_per_actor", help="one GPU per actor")
    p.add_argument("--max-attempts", type=int, default=d("max_attempts"),
                   help="tries of a study whose worker process dies, then it is recorded as failed")
    p.add_argument("--threads", type=int, default=d("threads"),
                   help="torch threads per actor (default: its CPUs, or with --actors the node's cores shared among them)")
    p.add_argument("--report-figures", type=int, default=d("report_figures"), help="overlay PNGs in report.md")
    p.add_argument("--limit", type=int, default=d("limit"), help="segment at most N new studies this run")
    p.add_argument("--diagnosis", default=d("diagnosis"),
                   help="ACDC diagnosis of patients with ED and ES (Info.cfg): 'shipped', a JSON file from "
                        "`python -m raysegment.diagnosis fit`, models:/raysegment-diagnosis@champion, or 'none'")
    p.add_argument("--since", type=int, default=d("since_days"), metavar="DAYS",
                   help="DICOMweb input: only series of studies dated today or in the DAYS days before (QIDO-RS "
                        "StudyDate range), so each poll of a large PACS asks about recent series only; default: every "
                        "MR series, one instance query each per poll")
    p.add_argument("--pacs-auth", metavar="FILE",
                   help="DICOMweb input: file holding the PACS's credentials, USER:PASSWORD (HTTP basic) or 'Bearer TOKEN' "
                        "(not the command line, which ps shows)")
    p.add_argument("--no-sr", action="store_true",
                   help="DICOM input: write no indices SR (for a PACS that takes no Comprehensive 3D SR); "
                        "results.csv keeps the indices")
    p.add_argument("--no-store", action="store_true",
                   help="DICOMweb input: keep the SEGs under OUTPUT/dicom/, do not STOW-RS them to the server")
    p.add_argument("--retry-failed", action="store_true",
                   help="segment again studies that failed for good before (environment errors are always retried)")
    return p


def done_line(summary: dict, output: str) -> str:
    """The run's last console line, from ``run_batch``'s counts (``OUTPUT/last_run.json`` has them all)."""
    s = summary
    text = (f"done: {s['segmented']} segmented, {s['failed']} failed, {s['not_cine']} not cine, {s['errors']} "
            f"error{'' if s['errors'] == 1 else 's'} to retry; {s['already_done']} already done by {s['version']}")
    if s.get("later"):
        text += f"; {s['later']} left to later runs (--limit)"
    if s.get("pacs_kept"):
        text += (f"; the PACS deletes nothing: {s['pacs_kept']} SEG or SR set{'' if s['pacs_kept'] == 1 else 's'} "
                 f"stored beside the earlier ones it keeps")
    if s.get("sr_errors"):
        text += (f"; {s['sr_errors']} indices SR{'' if s['sr_errors'] == 1 else 's'} to store next run "
                 f"(--no-sr for a PACS that takes none)")
    if "dice_vs_gt" in s:
        d = s["dice_vs_gt"]
        text += (f". Dice against the reference masks ({d['volumes']} frames): RV {d['dice_rv']:.3f}, MYO {d['dice_myo']:.3f}, "
                 f"LV {d['dice_lv']:.3f}, mean {d['dice_mean']:.3f}")
    return text + f". Results: {Path(output) / 'report.md'}"


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    from raysegment.cli.args import check_args, check_models, check_registry, diagnosis_ref, pacs_auth

    check_args(p, a)
    if Path(a.output).exists() and not Path(a.output).is_dir():
        p.error(f"--output {a.output}: a file, not a folder")
    if Path(a.input).is_file():
        p.error(f"--input {a.input}: a file; give the folder that holds it (every study in it is segmented once), "
                f"or raysegment.segment(FILE) in Python for one study")
    if a.exclude and is_dicomweb(a.input):
        p.error("--exclude leaves out files of a folder input; a PACS's series are not files")
    if a.pacs_auth and not is_dicomweb(a.input):
        p.error("--pacs-auth gives a PACS's credentials; the input is a folder")
    if a.since is not None and not is_dicomweb(a.input):
        p.error("--since picks a PACS's series by their study date; a folder input is segmented whole (use --exclude)")
    if a.runtime == "onnx" and a.gpus_per_actor > 0:
        p.error("--runtime onnx runs on the CPU (ONNX Runtime's CPU provider); drop --gpu/--gpus-per-actor")
    quiet_environment()  # before MLflow loads: no INFO lines of a registry lookup
    check_registry(a)
    check_models(p, a.models, a.mlflow_uri)
    config = InferConfig(models=tuple(a.models), input=a.input, output=a.output, tracking_uri=a.mlflow_uri,
                         predict=PredictConfig(device="cuda" if a.gpus_per_actor > 0 else "cpu", flip_tta=a.flip_tta,
                                               batch_size=a.batch_size, precision=a.precision,
                                               runtime=a.runtime, in_plane=a.in_plane),
                         actors=a.actors, cpus_per_actor=a.cpus_per_actor, gpus_per_actor=a.gpus_per_actor,
                         threads=a.threads, report_figures=a.report_figures, limit=a.limit, max_attempts=a.max_attempts,
                         retry_failed=a.retry_failed, diagnosis=diagnosis_ref(a.diagnosis), store=not a.no_store, sr=not a.no_sr,
                         exclude=tuple(a.exclude), since_days=a.since, pacs_auth=pacs_auth(p, a.pacs_auth))
    try:
        with watch_cluster(lambda lost, why: _lost_line(a.output, lost, why)):
            summary = run_batch(config)
    except (PacsUnreachable, ClusterUnreachable) as exc:  # as a study's error row: the next run tries again
        print(f"error: {exc}; nothing was segmented, the next run tries again", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as exc:  # before any study was segmented (finding, hashing, actors starting)
        if not stop_signal(exc):
            raise
        print("interrupted: nothing segmented; the same command starts again", file=sys.stderr, flush=True)
        return INTERRUPTED
    if summary.get("interrupted"):
        finished = sum(summary[k] for k in ("segmented", "failed", "not_cine", "errors"))
        left = summary["studies"] - summary["already_done"] - finished
        print(f"interrupted: {finished} studies finished this run (in {a.output}: ledger.jsonl, results, report.md); "
              f"the same command segments the other {left}", file=sys.stderr, flush=True)
        return INTERRUPTED
    print(f"[raysegment] {done_line(summary, a.output)}")
    # 1: some studies met an environment error (PACS, disk) and wait for the next run; a cron
    # wrapper or Kubernetes CronJob sees the run as failed. Bad input alone (failed rows) is 0.
    return 1 if summary["errors"] or summary.get("sr_errors") else 0


def _lost_line(output: str, lost, why: str) -> str:
    """The line of a batch whose Ray went away (``cli.lost``): what finished is in the ledger; the
    results and report are written by the next run, which segments the rest."""
    what, when = cluster_gone(lost, why)
    return (f"error: {what}; the studies this run finished are in {output}/ledger.jsonl; {when}the same command "
            f"segments the rest and writes the results and report")


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: Ray pickles functions and classes
    # of __main__ by value (with every global they touch, e.g. torch.backends.cudnn, which cannot
    # be pickled), those of raysegment.inference.batch by reference.
    from raysegment.cli.infer import main as _main

    sys.exit(_main())
