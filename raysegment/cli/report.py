"""``python -m raysegment.report``: evaluation, paired comparison, clinical agreement and figures from the command
line, over ``raysegment.reporting.report`` (``compare``: ``cli.report_compare``). Top layer: may import every stage."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raysegment.analysis.paired import RESAMPLES
from raysegment.cli import command_parser
from raysegment.cli.report_compare import compare_command
from raysegment.cli.report_masks import MASKS_HELP, axes_note, clinical_context, given_masks, model_masks
from raysegment.config import IN_PLANE
from raysegment.data.masks import is_mask_folder
from raysegment.inference.evaluation import evaluate, evaluate_masks, figures
from raysegment.reporting.report import (
    CLINICAL_INDICES,
    SPLITS,
    bland_altman,
    clinical_records,
    clinical_summary,
    clinical_table,
    dice_table,
    level_plot,
    level_table,
    write_clinical_csv,
)

# Options that change how a model predicts: nothing to change in masks already written.
_MODEL_ONLY = ("flip_tta", "no_largest_component", "auto_in_plane", "mask_cache")


def _figure_label(ref: str) -> str:
    """A model's name in figure titles and file names when ``--model`` gives none: ``shipped:B`` → B
    (the file name had a colon), a file or folder → its stem, ``models:/N@A`` → N@A."""
    return ref.split(":", 1)[1] if ref.startswith("shipped:") else Path(ref).stem


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m raysegment.report`` command line (also used to dry-run job specs)."""
    p = command_parser(
        "report",
        "Score models against the reference masks of prepared shards: Dice and HD95 per class and phase, "
        "clinical indices (volumes, EF, mass) with agreement plots, paired comparisons of two models, figures.",
        "python -m raysegment.report evaluate --model shipped:densenet121 --data /data/shards",
        "python -m raysegment.report compare --a ~/runs/mnv2 --b ~/runs/mnv2-ds --data /data/shards --out /tmp/compare")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    _add_evaluate(sub)
    cl = sub.add_parser("clinical", help="clinical indices (EDV, ESV, EF, mass, wall thickness) against the "
                                         "reference masks: MAE, bias, limits of agreement, r, Bland-Altman plots")
    src = cl.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", action="append", help="segment with this model (repeat: an ensemble)")
    src.add_argument("--masks", type=Path, help=f"{MASKS_HELP}, or a `python -m raysegment.diagnosis crossval-masks` "
                                                  "folder, instead of a model")
    cl.add_argument("--data", required=True, help="shards with spacing (prepare reads info.csv / NIfTI headers)")
    cl.add_argument("--basal-check", default="none",
                    help="apply the basal ES check of a diagnosis model ('shipped', a JSON file, models:/…) or 'none'")
    cl.add_argument("--diagnosis", default=None,
                    help="also score this diagnosis model ('shipped', a JSON file, models:/…) on the masks' features "
                         "against the patients' groups (its own basal ES check applied)")
    cl.add_argument("--flip-tta", action="store_true", help="with --model: average with the mirrored image's prediction")
    cl.add_argument("--ci", action="store_true",
                    help="add each index's MAE and bias with 95 %% bootstrap CIs over patients (seed 0)")
    cl.add_argument("--splits", nargs="+", default=["val"], choices=SPLITS, help="splits of --data to score")
    cl.add_argument("--mlflow-uri", default=None, help="tracking server of the registry, for models:/ references")
    cl.add_argument("--out", required=True, type=Path, help="folder for clinical.md, clinical.csv, bland_altman.png")
    cl.add_argument("--mask-cache", type=Path, default=None,
                    help="with --model: a folder keeping the masks (as `diagnosis fit/basal --mask-cache`)")
    _add_compare(sub)
    fi = sub.add_parser("figures", help="learning curves and val overlays of one or more models")
    fi.add_argument("--model", action="append", required=True, metavar="NAME=MODEL",
                    help="a checkpoint or run folder, .safetensors file, shipped:BACKBONE or models:/ URI, repeatable "
                         "(learning curves: those that carry their history, not models:/), or a folder of another "
                         "tool's masks (as `report evaluate --masks`: overlays only)")
    fi.add_argument("--data", required=True, help="shards folder whose val split the overlays show")
    fi.add_argument("--mlflow-uri", default=None, help="tracking server of the registry, for models:/ references")
    fi.add_argument("--patient", default=None, help="val patient for the overlays (default: the first)")
    fi.add_argument("--out", required=True, help="folder for the PNGs")
    return p


def _add_evaluate(sub) -> None:
    ev = sub.add_parser("evaluate", help="Dice/HD95 table of a model on the shards' train and val splits")
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", action="append",
                      help="checkpoint folder, .safetensors file or models:/ URI; repeat it to evaluate an ensemble")
    what.add_argument("--masks", type=Path, help=MASKS_HELP + ", scored as they are")
    ev.add_argument("--data", required=True, help="shards folder from raysegment.prepare")
    ev.add_argument("--splits", nargs="+", choices=SPLITS,
                    help="splits of --data to score (default: those it holds, train and val)")
    ev.add_argument("--mlflow-uri", default=None, help="tracking server of the registry, for models:/ references")
    ev.add_argument("--flip-tta", action="store_true", help="average with the mirrored image's prediction")
    ev.add_argument("--no-largest-component", action="store_true",
                    help="score the raw argmax, without keeping each structure's largest 3-D component")
    ev.add_argument("--ci", action="store_true",
                    help="add each split's mean Dice with a 95 %% bootstrap CI over patients (seed 0)")
    ev.add_argument("--by-level", action="store_true",
                    help="also Dice and volume error (mL) at the base, mid-ventricle and apex (thirds of the "
                         "reference's slices); with --out: levels.md, levels.json, levels.png")
    ev.add_argument("--in-plane", default="as-stored", choices=IN_PLANE,
                    help="score the volumes with their rows or columns reversed, or transposed: what a study "
                         "in another in-plane orientation than the training data's costs")
    ev.add_argument("--auto-in-plane", action="store_true",
                    help="predict as infer does by default (--in-plane auto: as stored or rows reversed, per volume) "
                         "and say what it chose")
    ev.add_argument("--out", default=None, help="folder for records.json and table.md")
    ev.add_argument("--mask-cache", type=Path, default=None,
                    help="a folder keeping each split's masks (shared with `report clinical --mask-cache`)")


def _add_compare(sub) -> None:
    """``report compare``'s arguments."""
    cp = sub.add_parser("compare", help="paired Dice (or clinical errors) of two models on the same volumes: B − A "
                                         "per class (index) with a bootstrap CI over patients, a scatter plot")
    for side in ("a", "b"):
        cp.add_argument(f"--{side}", required=True, action="append", metavar="MODEL",
                        help="checkpoint folder, .safetensors file or models:/ URI (repeat: an ensemble), the "
                             "records.json of `report evaluate --out` (with --metric clinical: the clinical.csv of "
                             "`report clinical --out`), or a folder of another tool's masks (as `report evaluate "
                             "--masks`)")
        cp.add_argument(f"--label-{side}", default=None, help=f"name of side {side.upper()} in the table and plot")
    cp.add_argument("--metric", choices=("dice", "clinical"), default="dice",
                    help="dice: 3-D Dice per volume (a side may be a records.json of `report evaluate --out`); "
                         "clinical: each clinical index's absolute error per patient (a side may be a clinical.csv "
                         "of `report clinical --out`)")
    cp.add_argument("--by-level", action="store_true",
                    help="with --metric dice: also B − A per level of the heart (base, mid, apex) and each side's "
                         "slices missed / extra (a records.json side needs the levels.json of "
                         "`report evaluate --by-level --out` beside it)")
    cp.add_argument("--basal-check", default="none",
                    help="with --metric clinical: the basal ES check applied to each model's masks, as in `report clinical`")
    cp.add_argument("--data", default=None, help="shards (needed unless both sides are records.json / clinical.csv files)")
    cp.add_argument("--splits", nargs="+", default=["val"], choices=SPLITS, help="splits of --data to score")
    cp.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap draws of the patients (at least 100)")
    cp.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    cp.add_argument("--mlflow-uri", default=None, help="tracking server of the registry, for models:/ references")
    cp.add_argument("--mask-cache", type=Path, default=None, help="as for `report evaluate`")
    cp.add_argument("--out", type=Path, default=None, help="folder for compare.md, compare.json and paired.png")


def _clinical_command(a) -> int:
    volumes, patients, basal = clinical_context(a)
    try:
        if a.masks:
            masks, source = given_masks(a.masks, volumes, a.data)
        else:
            masks = model_masks(a.model, volumes, a, flip_tta=a.flip_tta)
            source = " + ".join(a.model) + (" (flip TTA)" if a.flip_tta else "")
        if basal is not None:
            source += f", basal ES check of {a.basal_check}"
        records = clinical_records(volumes, masks, patients, basal)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cis = {}
    if a.ci:
        from raysegment.analysis.paired import error_ci

        cis = {f"{m}_ci": error_ci(records, CLINICAL_INDICES, signed=m == "bias") for m in ("mae", "bias")}
    table = clinical_table(clinical_summary(records), **cis)
    head = f"Clinical indices of {source} against the reference masks: {len(records)} patients ({', '.join(a.splits)})."
    if a.diagnosis:  # each patient's call goes in clinical.csv too (a test set has no groups to score)
        calls = _diagnoses(a.diagnosis, a.mlflow_uri, volumes, masks, patients)
        table += "\n\n" + _diagnosis_line(a.diagnosis, calls)
        for r in records:
            r |= calls.get(r["patient"], ("", {}))[1]
    print(head)
    print(table)
    a.out.mkdir(parents=True, exist_ok=True)
    png = bland_altman(records, a.out / "bland_altman.png")
    (a.out / "clinical.md").write_text(f"{head}\n\n{table}\n\n![Bland-Altman]({png.name})\n")
    write_clinical_csv(records, a.out / "clinical.csv")
    print(f"wrote {a.out / 'clinical.md'}, {png}")
    return 0


def _diagnoses(ref: str, tracking_uri: str | None, volumes, masks: dict, patients: dict) -> dict[str, tuple[str, dict]]:
    """Patient → (its reference group, the model's call): ``diagnosis`` and ``p_<GROUP>``, or
    ``diagnosis_withheld``, as ``infer`` gives them (``analysis.patient.diagnose``)."""
    from raysegment.analysis.basal import predicted_indices
    from raysegment.analysis.diagnosis import load
    from raysegment.analysis.patient import diagnose

    model = load(ref, tracking_uri)
    return {ed.patient: (ed.group, diagnose(ind, model))
            for ed, _, ind, _ in predicted_indices(volumes, masks, patients, model.basal_rv)}


def _diagnosis_line(ref: str, calls: dict[str, tuple[str, dict]]) -> str:
    """"Diagnosis (REF): k/n right (wrong: …; withheld: …)" over the patients with a reference group;
    then what ``calls`` (``_diagnoses``) made of the patients without one (a test set's ``Info.cfg``
    without ``Group:``, ACDC's patients 101–150)."""
    from collections import Counter

    from raysegment.analysis.diagnosis import GROUPS, misdiagnosed

    known = [(n, g, d) for n, (g, d) in calls.items() if g in GROUPS]
    called = [(n, g, d["diagnosis"]) for n, g, d in known if "diagnosis" in d]
    wrong = misdiagnosed([n for n, _, _ in called], [g for _, g, _ in called], [c for _, _, c in called])
    withheld = [f"{n} {d['diagnosis_withheld']}" for n, _, d in known if "diagnosis" not in d]
    parts = ([f"wrong: {', '.join(wrong)}"] if wrong else []) + ([f"withheld: {', '.join(withheld)}"] if withheld else [])
    line = f"Diagnosis ({ref}): " + (f"{len(called) - len(wrong)}/{len(known)} right" if known else
                                     "no patient with a reference group")
    line += f" ({'; '.join(parts)})" if parts else ""
    unknown = Counter(d.get("diagnosis", "withheld") for g, d in calls.values() if g not in GROUPS)
    if unknown:
        line += (f"; without a reference group ({sum(unknown.values())}): "
                 + ", ".join(f"{k} {c}" for k, c in sorted(unknown.items())))
    return line


def _check_splits(p, a) -> None:
    """Each of ``--splits`` is in the local shards (a test set's are all val, or all train).
    ``evaluate`` without ``--splits`` scores the splits the shards hold; ``clinical`` and ``compare``
    default to val, the patients no model trained on, and refuse shards without it."""
    from raysegment.data.dataset import is_bundle, shard_splits
    from raysegment.io import storage

    given = getattr(a, "splits", None)
    if a.cmd == "evaluate" and not given:
        a.splits = list(SPLITS)
    if not getattr(a, "splits", None) or not a.data or is_bundle(a.data) or storage.is_uri(a.data):
        return
    held = shard_splits(a.data)  # none: a manifest without shards, which the reader names
    missing = [s for s in a.splits if s not in held] if held else []
    if not missing:
        return
    if given or a.cmd != "evaluate":
        hint = " (a test set: prepare it with --val-fraction 1, all val)" if held == ["train"] else ""
        p.error(f"--splits {' '.join(a.splits)}: {a.data} holds no {' or '.join(missing)} split; give --splits "
                f"{' '.join(held)}{hint}")
    a.splits = [s for s in a.splits if s in held]
    how = "--val-fraction 1" if "train" in missing else "--val-fraction 0"
    print(f"note: {a.data} holds no {' or '.join(missing)} split (a test set, prepared with {how}?): scoring "
          f"its {' and '.join(a.splits)} split", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from raysegment.cli.args import check_data, check_models, check_numbers, check_registry
    from raysegment.runtime import quiet_environment

    p = build_parser()
    a = p.parse_args(argv)
    check_numbers(p, a)
    check_data(p, a.data)
    _check_splits(p, a)
    quiet_environment()  # before MLflow loads (models:/ references): no INFO lines, no download bars
    models = dict(m.split("=", 1) if "=" in m else (_figure_label(m), m) for m in a.model) if a.cmd == "figures" else {}
    check_registry(a)
    refs = list(models.values()) if a.cmd == "figures" else getattr(a, "model", None) or []
    check_models(p, [r for r in refs if not is_mask_folder(r)], a.mlflow_uri)
    if a.cmd != "figures":
        axes_note(a)
    if a.cmd == "clinical":
        return _clinical_command(a)
    if a.cmd == "compare":
        return compare_command(a)
    if a.cmd == "figures":
        for path in figures(models, a.data, Path(a.out), a.patient, a.mlflow_uri):
            print(path)
        return 0
    return _evaluate_command(p, a)


def _evaluate_command(p, a) -> int:
    """``report evaluate``: the Dice/HD95 table (per level too), written under ``--out``."""
    import json

    levels, turns = ([] if a.by_level else None), {}
    if a.masks and (given := [f"--{o.replace('_', '-')}" for o in _MODEL_ONLY if getattr(a, o)]
                    + (["--in-plane"] if a.in_plane != "as-stored" else [])):
        p.error(f"{' '.join(given)}: how a model predicts; --masks are scored as they are")
    try:
        if a.masks:
            records = evaluate_masks(a.masks, a.data, a.splits, levels)
        else:
            records = evaluate(model_ref=a.model, shards=a.data, splits=a.splits, tracking_uri=a.mlflow_uri,
                               flip_tta=a.flip_tta, largest_component=not a.no_largest_component,
                               mask_cache=a.mask_cache, levels=levels, in_plane=a.in_plane,
                               auto_in_plane=a.auto_in_plane, turns=turns)
    except (ValueError, FileNotFoundError) as exc:  # e.g. --flip-tta on a model trained without flips
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = dice_table(records)
    if a.ci:
        from raysegment.analysis.paired import dice_ci
        from raysegment.reporting.paired import ci_line

        splits = [s for s in a.splits if any(r["split"] == s for r in records)]
        table += "\n\n" + "\n".join(ci_line(s, dice_ci([r for r in records if r["split"] == s]), RESAMPLES)
                                      for s in splits)
    if a.auto_in_plane:
        table += "\n\n--auto-in-plane chose: " + ", ".join(f"{how} {n}" for how, n in sorted(turns.items())) + " (volumes)"
    print(table)
    if levels is not None:
        print("\n" + level_table(levels))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "records.json").write_text(json.dumps(records, indent=1))
        (out / "table.md").write_text(table + "\n")
        if levels is not None:
            from raysegment.io.files import json_safe

            (out / "levels.json").write_text(json.dumps(json_safe(levels), indent=1))  # a level without RV: null
            (out / "levels.md").write_text(level_table(levels) + "\n")
            print(level_plot(levels, out / "levels.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
