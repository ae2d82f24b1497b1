"""``python -m raysegment.prepare``: ACDC → Parquet shards from the command line, over
``raysegment.data.prepare``.

Top layer (no stage imports it): imports ``data`` and ``config``.
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from raysegment.cli import INTERRUPTED, command_parser
from raysegment.config import default_of
from raysegment.data.prepare import DEFAULT_VAL_FRACTION, FORMATS, PrepareConfig, PrepareError, prepare


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m raysegment.prepare`` command line (also used to dry-run job specs)."""
    p = command_parser(
        "prepare",
        "Prepare ACDC into Parquet shards for training and evaluation: one row per slice with its true spacing "
        "and patient metadata, split by patient. Reads the official NIfTI release (patientNNN folders with "
        "Info.cfg), the SSL4MIS HDF5 layout or nnU-Net's raw layout (Dataset027_ACDC: imagesTr, labelsTr, "
        "dataset.json); --out is written whole or not at all.",
        "python -m raysegment.prepare --source /data/ACDC/training --out /data/shards")
    p.add_argument("--source", required=True, type=Path, help="ACDC folder (official NIfTI, SSL4MIS h5 or nnU-Net raw)")
    p.add_argument("--out", required=True, type=Path, help="output folder for the shards (created atomically)")
    d = lambda name: default_of(PrepareConfig, name)  # noqa: E731
    p.add_argument("--format", default=d("source_format"), choices=["auto", *FORMATS])
    p.add_argument("--val-file", type=Path, default=d("val_file"),
                   help="text file of validation patient ids, or nnU-Net's splits_final.json with --fold")
    p.add_argument("--fold", type=int, default=d("fold"), help="with nnU-Net's splits_final.json: the fold whose val "
                   "patients are val (its other patients train)")
    p.add_argument("--val-fraction", type=float, default=d("val_fraction"), help="a seeded share of the patients, "
                   "stratified by group, to val (default: the source's val.txt where it has one, else "
                   f"{DEFAULT_VAL_FRACTION}); 1: every patient val (a test set, which report scores by default)")
    p.add_argument("--seed", type=int, default=d("seed"), help="seed of the --val-fraction split")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    config = PrepareConfig(
        source=a.source,
        out=a.out,
        source_format=a.format,
        val_file=a.val_file,
        fold=a.fold,
        val_fraction=a.val_fraction,
        seed=a.seed,
        overwrite=a.overwrite,
        progress=not a.no_progress,
    )
    try:
        manifest = prepare(config)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # prepare removes its temporary folder; --out is replaced only when complete
        print(f"interrupted: nothing written, {a.out} is as it was; the same command starts again", file=sys.stderr)
        return INTERRUPTED
    except OSError as exc:  # read-only or full disk under --out: nothing half-written is left (prepare cleans up)
        full = exc.errno == errno.ENOSPC  # an environment fault a scheduler retries (exit 1), as train's
        print(f"error: cannot write {a.out}: {exc.strerror or exc}"
              f"{' (' + exc.filename + ')' if getattr(exc, 'filename', None) else ''}"
              f"{'; nothing was written, free space there and run the same command again' if full else ''}",
              file=sys.stderr)
        return 1 if full else 2
    c = manifest["counts"]
    print(
        f"wrote {a.out}: patients {c['patients']}, volumes {c['volumes']}, slices {c['slices']}, "
        f"hash {manifest['content_hash'][:12]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
