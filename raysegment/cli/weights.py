"""``python -m raysegment.weights``: export, seal and verify weights files, over
``raysegment.model.weights``.

Top layer (no stage imports it): imports ``inference`` and ``model``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from raysegment.cli import command_parser
from raysegment.model.checkpoint import last_checkpoint, read_state
from raysegment.model.weights import SHIPPED_DIR, export_weights, seal, sha256, verify


def build_parser():
    """The ``python -m raysegment.weights`` command line."""
    p = command_parser(
        "weights",
        "Weights files: export a run's last epoch (or a checkpoint) as .safetensors with its config inside, "
        "write a model as ONNX, seal a file's digest, verify the shipped files against SHA256SUMS.",
        "python -m raysegment.weights export ~/runs/mnv2 --out mnv2.safetensors",
        "python -m raysegment.weights export-onnx shipped:densenet121 --out densenet121.onnx")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    ex = sub.add_parser("export", help="checkpoint folder → fp16 .safetensors, its SHA-256 added to SHA256SUMS")
    ex.add_argument("checkpoint", help="a checkpoint folder, or a run folder (--storage/--name): its latest epoch's")
    ex.add_argument("--out", required=True, help="e.g. raysegment/shipped/mobilenet_v2.safetensors")
    ex.add_argument("--fp32", action="store_true", help="keep fp32 tensors (default: fp16, half the size)")
    se = sub.add_parser("seal", help="write the tensor digest into an older weights file (checked on every load)")
    se.add_argument("file")
    on = sub.add_parser("export-onnx", help="any model reference → an ONNX file (fp32; dynamic slices, height, width; "
                                            "its config in the metadata) for ONNX Runtime or other runtimes")
    on.add_argument("model", help="shipped:BACKBONE, a .safetensors file, a checkpoint folder or models:/NAME@ALIAS")
    on.add_argument("--out", required=True, help="the .onnx file to write")
    on.add_argument("--mlflow-uri", default=None, help="tracking server of the registry, for models:/ references")
    ve = sub.add_parser("verify", help="check the files against SHA256SUMS")
    ve.add_argument("--folder", default=str(SHIPPED_DIR), help="folder holding SHA256SUMS and the files")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return _run(a)
    except (OSError, ValueError) as exc:  # a file that is not there or not ours; DamagedWeights: NaN or inf
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(a) -> int:
    if a.cmd == "export":
        checkpoint = last_checkpoint(a.checkpoint)
        out = export_weights(checkpoint, a.out, half=not a.fp32)
        sums = out.parent / "SHA256SUMS"
        lines = [ln for ln in (sums.read_text().splitlines() if sums.exists() else []) if not ln.endswith(" " + out.name)]
        digest = sha256(out)
        sums.write_text("\n".join(sorted(lines + [f"{digest}  {out.name}"])) + "\n")
        epoch = read_state(checkpoint).get("epoch")
        print(f"{out} {out.stat().st_size / 1e6:.1f} MB sha256 {digest} (from {checkpoint}"
              + (f", epoch {epoch + 1})" if epoch is not None else ")"))
        return 0
    if a.cmd == "export-onnx":
        from raysegment.inference.predictor import load_model
        from raysegment.model.onnx import export_onnx

        loaded = load_model(a.model, a.mlflow_uri)
        out = export_onnx(loaded, a.out)
        print(f"{out} {out.stat().st_size / 1e6:.1f} MB from {loaded.version} (sha256 {sha256(out)})")
        return 0
    if a.cmd == "seal":
        print(f"{a.file}: tensors sha256 {seal(a.file)}")
        return 0
    if not (Path(a.folder) / "SHA256SUMS").is_file():
        raise FileNotFoundError(f"{a.folder}: no SHA256SUMS there (python -m raysegment.weights export writes it)")
    results = verify(a.folder)
    for name, ok in results.items():
        print(f"{name}: {'OK' if ok else 'MISMATCH'}")
    return 0 if results and all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
