"""The ``raysegment`` console script: ``raysegment COMMAND [options]`` runs ``python -m raysegment.COMMAND``.

May import every stage (it is the top layer); imports a command's module only when it runs.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "prepare": ("raysegment.cli.prepare", "ACDC (official NIfTI, SSL4MIS HDF5, nnU-Net raw) → Parquet shards"),
    "train": ("raysegment.cli.train", "one Ray Train run"),
    "tune": ("raysegment.cli.tune", "Ray Tune + Optuna search, final run, registration"),
    "infer": ("raysegment.cli.infer", "segment new studies (folder or PACS) on a schedule"),
    "serve": ("raysegment.cli.serve", "the online segmentation service (Ray Serve, HTTP)"),
    "registry": ("raysegment.cli.registry", "register, import, ensemble, list, promote models"),
    "report": ("raysegment.cli.report", "evaluate, compare, clinical agreement, figures (of models or masks)"),
    "diagnosis": ("raysegment.cli.diagnosis", "ACDC diagnosis: CV masks, fit, basal check"),
    "weights": ("raysegment.cli.weights", "export, seal, verify weights files"),
    "bench": ("raysegment.cli.bench", "speed and memory benchmarks"),
}


def usage() -> str:
    lines = ["usage: raysegment COMMAND [options]   (each command: raysegment COMMAND --help; "
             "raysegment --version)", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


# What a bug report needs besides raysegment's own version: the stack it runs on.
STACK = ("torch", "torchvision", "ray", "mlflow", "optuna", "nibabel", "pydicom", "python-gdcm", "highdicom")


def version_line() -> str:
    """``raysegment X.Y.Z (python …, torch …, …)``, from the installed packages' metadata (nothing imported)."""
    import platform
    from importlib import metadata

    from raysegment.config import VERSION

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"raysegment {VERSION} (python {platform.python_version()}, " + ", ".join(
        f"{name} {installed(name)}" for name in STACK) + ")"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(version_line())
        return 0
    if argv[0] not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"error: unknown command {argv[0]!r}{hint}\n{usage()}", file=sys.stderr)
        return 2
    from raysegment.cli import run

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return run(module.main, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
