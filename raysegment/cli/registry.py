"""``python -m raysegment.registry``: register, import, ensemble, list and promote models from the
command line, over ``raysegment.registry.champion`` and ``raysegment.registry.versions``. Top layer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raysegment.cli import command_parser
from raysegment.cli.args import check_data, check_numbers, check_registry_answers
from raysegment.config import DEFAULT_TRACKING_URI
from raysegment.registry.champion import import_weights, register_diagnosis, register_ensemble, register_scored
from raysegment.runtime import quiet_environment


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m raysegment.registry`` command line (also used to dry-run job specs)."""
    p = command_parser(
        "registry",
        "The MLflow model registry: register a checkpoint or import a weights file, each scored on the val "
        "split of --data and made @champion only when it beats the current one; register an ensemble or the "
        "diagnosis classifier; list the versions; make one the champion by hand (a rollback).",
        "python -m raysegment.registry import raysegment/shipped/densenet121.safetensors --data /data/shards "
        "--mlflow-uri http://mlflow:5000")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    imp = sub.add_parser("import", help="register a weights file (.safetensors), scored on the val split of --data")
    imp.add_argument("weights")
    imp.add_argument("--data", default=None, help="shards whose val split scores it (Dice tags, champion rule); "
                                                  "without it the file's own Dice claim is tagged and it is never champion")
    imp.add_argument("--mlflow-uri", default=DEFAULT_TRACKING_URI, help="MLflow tracking server or database")
    imp.add_argument("--force-champion", action="store_true",
                     help="make it the champion even if it does not beat the current one")
    ens = sub.add_parser("ensemble", help="register an ensemble (raysegment-ensemble) of two or more models, "
                                          "scored on the val split of --data")
    ens.add_argument("--member", required=True, action="append", dest="members",
                     help="models:/NAME@ALIAS or /VERSION, checkpoint folder or .safetensors file; repeat it")
    ens.add_argument("--data", required=True, help="shards whose val split scores the ensemble (Dice tags)")
    ens.add_argument("--flip-tta", action="store_true", help="score the ensemble with flip TTA (tag flip_tta)")
    ens.add_argument("--mlflow-uri", default=DEFAULT_TRACKING_URI, help="MLflow tracking server or database")
    ens.add_argument("--force-champion", action="store_true",
                     help="make it the champion even if it does not beat the current one")
    reg = sub.add_parser("register", help="register a training checkpoint folder, scored on the val split of --data")
    reg.add_argument("checkpoint")
    reg.add_argument("--data", default=None, help="as for import")
    reg.add_argument("--mlflow-uri", default=DEFAULT_TRACKING_URI, help="MLflow tracking server or database")
    reg.add_argument("--force-champion", action="store_true",
                     help="make it the champion even if it does not beat the current one")
    dg = sub.add_parser("diagnosis", help="register a `python -m raysegment.diagnosis fit` JSON as raysegment-diagnosis "
                                          "(champion by the one champion rule on its CV accuracy)")
    dg.add_argument("model_file", help="the JSON file, or 'shipped'")
    dg.add_argument("--mlflow-uri", default=DEFAULT_TRACKING_URI, help="MLflow tracking server or database")
    ls = sub.add_parser("list", help="each raysegment model's versions: champion, date, score, origin")
    ls.add_argument("name", nargs="?", default=None, help="one registered model (default: every raysegment-* model)")
    ls.add_argument("--last", type=int, default=None, metavar="N",
                    help="the N newest versions of each model (and the champion, if older); default: all")
    ls.add_argument("--mlflow-uri", default=DEFAULT_TRACKING_URI, help="MLflow tracking server or database")
    pr = sub.add_parser("promote", help="make VERSION the champion by hand (a rollback): services and scheduled jobs "
                                        "following @champion switch to it")
    pr.add_argument("name", help="the registered model, e.g. raysegment-mobilenet_v2, or NAME/VERSION as a service's "
                                 "X-Model-Version header and infer's results name it (models:/ in front or not)")
    pr.add_argument("version", nargs="?", default=None, help="its version number")
    pr.add_argument("--reason", required=True, help="why, in words: written on the version with the date and the "
                                                    "version it replaces")
    pr.add_argument("--mlflow-uri", default=DEFAULT_TRACKING_URI, help="MLflow tracking server or database")
    return p


def _name_version(p: argparse.ArgumentParser, name: str, version: str | None) -> tuple[str, str]:
    """``NAME VERSION``, ``NAME/VERSION`` or ``models:/NAME/VERSION`` → (NAME, VERSION); ``v3`` is 3."""
    name = name.removeprefix("models:/")
    if version is None and "/" in name:
        name, version = name.rsplit("/", 1)
    if version is None or not version.removeprefix("v").isdigit():
        given = "" if version is None else f", not {version!r}"
        p.error(f"registry promote {name}: which version? Give NAME VERSION or NAME/VERSION (a number{given})")
    return name, version.removeprefix("v")


def _list(name: str | None, tracking_uri: str, last: int | None = None) -> None:
    from mlflow import MlflowClient

    from raysegment.registry.versions import registered_names, version_rows

    client = MlflowClient(tracking_uri)
    names = [name] if name else registered_names(client)
    if not names:
        print(f"no raysegment models registered in {tracking_uri}")
    for n in names:
        rows = version_rows(client, n)  # newest first
        shown = rows if last is None else [r for i, r in enumerate(rows) if i < last or r.champion]
        print(n)
        for r in shown:
            print(f"  v{r.version:<4} {'champion' if r.champion else '':<9} {r.created}  {r.score}  {r.origin}")
        if len(shown) < len(rows):
            print(f"  … {len(rows) - len(shown)} older version(s) not shown (--last {last})")


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    check_numbers(p, a)
    check_data(p, getattr(a, "data", None))
    quiet_environment()  # before MLflow loads: no INFO lines, no download bars
    check_registry_answers(a.mlflow_uri)
    try:
        if a.cmd == "list":
            _list(a.name, a.mlflow_uri, a.last)
            return 0
        if a.cmd == "promote":
            from raysegment.registry.versions import promote

            name, version = _name_version(p, a.name, a.version)
            r = promote(name, version, reason=a.reason, tracking_uri=a.mlflow_uri)
            print(f"{r.name}@champion is v{r.version}" + (f" ({r.reason})" if r.new else f": {r.reason}"))
            return 0
        if a.cmd == "import":
            r = import_weights(a.weights, a.mlflow_uri, shards=a.data, force_champion=a.force_champion)
        elif a.cmd == "diagnosis":
            from raysegment.analysis.diagnosis import SHIPPED

            r = register_diagnosis(SHIPPED if a.model_file == "shipped" else Path(a.model_file), tracking_uri=a.mlflow_uri)
        elif a.cmd == "ensemble":
            r = register_ensemble(a.members, shards=a.data, tracking_uri=a.mlflow_uri, flip_tta=a.flip_tta,
                                  force_champion=a.force_champion)
        else:
            r = register_scored(a.checkpoint, a.mlflow_uri, shards=a.data, force_champion=a.force_champion)
    except (ValueError, FileNotFoundError) as exc:  # DamagedWeights included
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'registered' if r.new else 'already registered:'} {r.name} v{r.version}; champion: {r.champion} ({r.reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
