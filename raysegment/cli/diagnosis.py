"""``python -m raysegment.diagnosis``: cross-validated masks, fitting the classifier and the basal
ES check, over ``raysegment.analysis.diagnosis``. Top layer: may import every stage."""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from raysegment.analysis.basal import basal_check_agreement, basal_table, excess_by_slice, fit_basal_check
from raysegment.analysis.diagnosis import (
    FEATURES,
    GROUPS,
    confusion_markdown,
    cross_validate,
    fit,
    load,
    load_crossval_masks,
    median_bsa_m2,
    misdiagnosed,
    patient_features,
)
from raysegment.cli import command_parser
from raysegment.cli.args import progress_line
from raysegment.data.dataset import all_volumes, pack_bundle
from raysegment.training.crossval import crossval_ensemble, crossval_fold

MASK_CACHE_HELP = ("a folder keeping each segmenter's masks of these volumes (keyed by model version, settings and "
                   "volumes): a later fit, basal or report clinical reads them instead of segmenting again")


def _fit_command(a) -> int:
    from raysegment.data.prepare import load_manifest

    manifest = load_manifest(a.data)
    volumes = all_volumes(a.data)
    masks, source = _fit_masks(a, volumes)
    train, val = set(manifest["splits"]["train"]), set(manifest["splits"].get("val", []))
    # The basal check learns from the train split only, so val keeps measuring it on unseen patients.
    basal = fit_basal_check(volumes, masks, train, seed=a.seed)
    # A patient without height or weight is indexed by the others' median BSA, in fitting as in use.
    bsa = median_bsa_m2(sorted({v.patient for v in volumes}), manifest.get("patients", {}))
    names, x, y = patient_features(volumes, masks, manifest.get("patients", {}), basal, bsa)
    if unknown := [n for n, g in zip(names, y) if g not in GROUPS]:  # e.g. Info.cfg without Group: (a test set)
        print(f"note: left out, without a reference group ({len(unknown)}): {', '.join(unknown[:5])}"
              f"{', …' if len(unknown) > 5 else ''}", file=sys.stderr)
        keep = [i for i, g in enumerate(y) if g in GROUPS]
        names, x, y = [names[i] for i in keep], x[keep], [y[i] for i in keep]
    if len(set(y)) < 3 or len(names) < 10:  # the JSON classifier is multinomial: 3 groups or more
        print(f"error: {len(names)} patients with ED and ES masks, groups {sorted(set(y))}: too few to fit", file=sys.stderr)
        return 2
    if missing := [f for f, known in zip(FEATURES, np.isfinite(x).any(0)) if not known]:
        print(f"warning: no patient has a value for {', '.join(missing)} (the masks lack a structure?); "
              f"the classifier fills them with 0", file=sys.stderr)
    t0 = time.perf_counter()
    cv = cross_validate(x, y, repeats=a.repeats, seed=a.seed)
    meta = {"accuracy": cv["accuracy"], "accuracy_sd": cv["accuracy_sd"], "cv": cv, "segmenter": a.segmenter or " + ".join(a.model or []),
            "patients": len(names), "manifest_hash": manifest.get("content_hash", ""), "masks": source}
    held = _val_check(names, x, y, train, val, a.seed)
    check = ""
    if held:
        meta["val_check"] = held
        check = (f"Val check (fitted on the train split's {held['fitted_on']} patients, scored on the val split's "
                 f"{held['n']}): {held['correct']}/{held['n']} right ({', '.join(held['wrong']) or 'none wrong'}).")
        print(check)
    model = replace(fit(x, y, seed=a.seed, meta=meta, bsa_m2=bsa), basal_rv=basal)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(model.to_json() + "\n")
    table = confusion_markdown(cv)
    summary = (f"Diagnosis from predicted masks ({source}): {cv['folds']}-fold stratified CV × {cv['repeats']} on "
               f"{cv['n']} patients, accuracy {cv['accuracy']:.3f} ± {cv['accuracy_sd']:.3f} (SD over repeats); "
               f"confusion summed over repeats:")
    a.out.with_suffix(".md").write_text(summary + "\n\n" + table + "\n" + (f"\n{check}\n" if check else ""))
    with open(a.out.with_suffix(".features.csv"), "w", newline="") as f:  # the csv module quotes what needs it
        writer = csv.writer(f)
        writer.writerow(("patient", "group") + FEATURES)
        writer.writerows([n, g] + [f"{v:.4g}" for v in row] for n, g, row in zip(names, y, x))
    print(summary)
    print(table)
    if bsa is not None:
        print(f"A patient without height or weight is indexed by {bsa:.2f} m², the median BSA of the patients here.")
    print(f"wrote {a.out} ({time.perf_counter() - t0:.0f} s); register it with "
          f"`python -m raysegment.registry diagnosis {a.out} --mlflow-uri URI`")
    return 0


def _fit_masks(a, volumes) -> tuple[dict, str]:
    """The masks ``fit`` learns from: a ``crossval-masks`` folder, or the ``--model`` segmenters'
    own (their ensemble when several), and a line saying which."""
    if a.masks is not None:
        return load_crossval_masks(a.masks, volumes), str(a.masks)
    from raysegment.config import PredictConfig
    from raysegment.inference.predictor import Predictor, predicted_masks

    predictor = Predictor.load(a.model if len(a.model) > 1 else a.model[0], PredictConfig(), a.mlflow_uri)
    masks = predicted_masks(predictor, volumes, a.mask_cache, progress_line(" + ".join(a.model)))
    # Patients a segmenter trained on get cleaner masks than unseen ones: said with the model.
    return masks, f"own masks of {' + '.join(a.model)} (its train patients seen in training)"


def _val_check(names: list[str], x, y: list[str], train: set, val: set, seed: int) -> dict | None:
    """The classifier fitted on the train split's patients, scored on the val split's (unseen by it
    and, with ``--model``, by the segmenters): counts and the patients it got wrong."""
    tr = [i for i, n in enumerate(names) if n in train]
    te = [i for i, n in enumerate(names) if n in val]
    if not te or len({y[i] for i in tr}) < 3:
        return None
    pred = fit(x[tr], [y[i] for i in tr], seed=seed).predict(x[te])
    wrong = misdiagnosed([names[i] for i in te], [y[i] for i in te], pred)
    return {"fitted_on": len(tr), "n": len(te), "correct": len(te) - len(wrong), "wrong": wrong}


def _basal_command(a) -> int:
    from raysegment.config import PredictConfig
    from raysegment.data.prepare import load_manifest
    from raysegment.inference.predictor import Predictor, predicted_masks

    if not a.model and not a.masks:
        print("error: basal needs --model or --masks (the masks to fit the check on)", file=sys.stderr)
        return 2
    manifest = load_manifest(a.data)
    volumes = [v for v in all_volumes(a.data) if v.spacing is not None]
    if not volumes:
        print(f"error: {a.data}: no volumes with spacing (re-run raysegment.data.prepare beside info.csv / with NIfTI headers)",
              file=sys.stderr)
        return 2
    current = load(a.diagnosis, a.mlflow_uri)
    predictors = {ref: Predictor.load(ref, PredictConfig(), a.mlflow_uri) for ref in a.model}
    if a.ensemble and len(a.model) > 1:
        flips = all(m.config.augment.flip_prob > 0 for p in predictors.values() for m in p.members)
        predictors[" + ".join(a.model) + (" (flip TTA)" if flips else "")] = Predictor.load(
            a.model, PredictConfig(flip_tta=flips), a.mlflow_uri)
    mask_sets = {name: predicted_masks(predictor, volumes, a.mask_cache, progress_line(name))
                 for name, predictor in predictors.items()}
    mask_sets.update({f"{folder} (fold masks)": load_crossval_masks(folder, volumes) for folder in a.masks})
    train, val = set(manifest["splits"]["train"]), set(manifest["splits"].get("val", []))
    where = ["Mean predicted − reference ES volume (mL) per slice from the base (train split):",
             "| masks | structure | slice 0 | 1 | 2 | 3 | below |", "|---|---|---|---|---|---|---|"]
    for name, masks in mask_sets.items():
        for structure, row in excess_by_slice(volumes, masks, train).items():
            where.append(f"| {name} | {structure} | " + " | ".join(f"{x:+.2f}" for x in row) + " |")
    print("\n".join(where), flush=True)
    records, check = basal_check_agreement(volumes, mask_sets, {"none": None, f"{a.diagnosis}'s": current.basal_rv},
                                           train, val, seed=a.seed)
    if check is None:
        print("error: the train split's basal ES slices are all of one kind: nothing to fit", file=sys.stderr)
        return 2
    check["segmenters"] = list(mask_sets)
    check["manifest_hash"] = manifest.get("content_hash", "")
    model = replace(current, basal_rv=check)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(model.to_json() + "\n")
    table = basal_table(records)
    head = (f"Basal ES check fitted on the masks of {', '.join(mask_sets)} on {len(train)} train patients; "
            f"train rows: patient-grouped 5-fold CV; val rows: the check fitted on every train patient.")
    a.out.with_suffix(".basal.md").write_text(head + "\n\n" + table + "\n\n" + "\n".join(where) + "\n")
    print(head)
    print(table)
    print(f"wrote {a.out} (the classifier of {a.diagnosis} with this check) and {a.out.with_suffix('.basal.md')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "diagnosis",
        "The ACDC diagnosis (NOR, MINF, DCM, HCM, RV) from segmentation-derived features: cross-validated "
        "masks, fitting the classifier and the basal ES check, packing shards into one bundle.",
        "python -m raysegment.diagnosis fit --data /data/shards --model shipped:densenet121 --out diagnosis.json",
        "python -m raysegment.diagnosis pack --data /data/shards --out acdc.npz")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_crossval_parsers(sub)
    _add_fit_parsers(sub)
    pk = sub.add_parser("pack", help="shards → one compressed .npz of 8-bit volumes and their train/val split "
                                     "(to carry to a GPU machine)")
    pk.add_argument("--data", required=True, help="shards folder from raysegment.prepare")
    pk.add_argument("--out", required=True, type=Path, help="the .npz bundle to write")
    return p


def _add_crossval_parsers(sub) -> None:
    """``crossval-masks`` and ``crossval-ensemble``: fold models and their held-out masks."""
    from raysegment.config import TrainConfig, default_of

    cv = sub.add_parser("crossval-masks", help="train one segmenter per fold, segment its held-out patients")
    cv.add_argument("--data", required=True, help="shards folder (both splits are used) or a `pack` bundle .npz")
    cv.add_argument("--out", required=True, type=Path, help="folder for fold{K}.npz / fold{K}.json")
    cv.add_argument("--folds", type=int, default=5, help="folds over the patients of both splits")
    cv.add_argument("--fold", type=int, action="append", help="only these folds (repeat; default: all, one after another)")
    cv.add_argument("--backbone", default="mobilenet_v2")
    cv.add_argument("--minutes", type=float, default=10.0, help="wall-time budget of each fold's training (min)")
    cv.add_argument("--epochs", type=int, default=200, help="most epochs per fold")
    cv.add_argument("--batch-size", type=int, default=default_of(TrainConfig, "batch_size"))
    cv.add_argument("--context-slices", type=int, default=0, choices=[0, 1], help="1: 2.5-D input (slices k-1, k, k+1)")
    cv.add_argument("--max-steps", type=int, default=None, help="steps per epoch at most (smoke tests)")
    cv.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: every core; 1 beside a training run in the background)")
    cv.add_argument("--device", default="cpu")
    cv.add_argument("--seed", type=int, default=0)
    cv.add_argument("--keep-models", action="store_true",
                    help="also write each fold's model (fold{K}.safetensors) for crossval-ensemble")
    ce = sub.add_parser("crossval-ensemble", help="fold masks of an ensemble: each fold's patients segmented by the "
                                                  "softmax-averaged fold models of several crossval-masks --keep-models runs")
    ce.add_argument("--data", required=True, help="the shards folder or `pack` bundle the folds were trained on")
    ce.add_argument("--member", action="append", required=True, type=Path,
                    help="a crossval-masks --keep-models folder (repeat, one per backbone; same --folds and --seed)")
    ce.add_argument("--out", required=True, type=Path, help="folder for fold{K}.npz / fold{K}.json")
    ce.add_argument("--device", default="cpu")


def _add_fit_parsers(sub) -> None:
    """``fit`` (the classifier) and ``basal`` (the basal ES check), from masks or segmenters."""
    ft = sub.add_parser("fit", help="features of predicted masks (cross-validated folds, or --model's own) → "
                                      "repeated CV accuracy, a val-split check, the fitted model (JSON)")
    ft.add_argument("--data", required=True, help="the shards the masks were made from (spacing, height, weight)")
    src = ft.add_mutually_exclusive_group(required=True)
    src.add_argument("--masks", type=Path, help="a `crossval-masks` folder")
    src.add_argument("--model", action="append", help="segment with this model instead (repeat: their ensemble); "
                                                      "its train patients' masks are cleaner than unseen ones'")
    ft.add_argument("--mlflow-uri", default=None, help="tracking server, for models:/ references")
    ft.add_argument("--mask-cache", type=Path, default=None, help=MASK_CACHE_HELP)
    ft.add_argument("--out", required=True, type=Path, help="the model's JSON file (beside it: FILE.md, FILE.features.csv)")
    ft.add_argument("--segmenter", default="", help="what made the masks, recorded with the model (e.g. a model version)")
    ft.add_argument("--repeats", type=int, default=10, help="repeats of the stratified k-fold accuracy estimate")
    ft.add_argument("--seed", type=int, default=0)
    bs = sub.add_parser("basal", help="fit the basal ES check on segmenters' own masks of the train split, compare it "
                                      "(patient-grouped CV on train, then val) and write it into a diagnosis model")
    bs.add_argument("--data", required=True, help="shards with spacing (both splits are segmented)")
    bs.add_argument("--model", action="append", default=[], help="a segmenter (repeat: each one's masks are pooled)")
    bs.add_argument("--masks", action="append", type=Path, default=[],
                    help="a crossval-masks folder: masks of patients their segmenter never saw (pooled likewise; "
                         "the check then learns the errors of unseen patients)")
    bs.add_argument("--ensemble", action="store_true",
                    help="also pool the masks of all --model together (softmax averaged, flip TTA where every member allows it)")
    bs.add_argument("--diagnosis", default="shipped", help="the diagnosis model whose check is compared and replaced")
    bs.add_argument("--out", required=True, type=Path, help="the diagnosis JSON to write (beside it: FILE.basal.md)")
    bs.add_argument("--mlflow-uri", default=None, help="tracking server of the registry, for models:/ references")
    bs.add_argument("--mask-cache", type=Path, default=None, help=MASK_CACHE_HELP)
    bs.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    from raysegment.cli.args import check_data, check_models, check_numbers, check_registry

    p = build_parser()
    a = p.parse_args(argv)
    check_numbers(p, a)
    check_data(p, str(a.data))
    check_registry(a)
    check_models(p, getattr(a, "model", None) or [], getattr(a, "mlflow_uri", None))
    if a.command == "pack":
        volumes = pack_bundle(a.data, a.out)
        print(f"{len(volumes)} volumes → {a.out} ({a.out.stat().st_size / 2**20:.1f} MiB)")
        return 0
    if a.command == "fit":
        return _fit_command(a)
    if a.command == "basal":
        return _basal_command(a)
    if a.command == "crossval-ensemble":
        try:
            for s in crossval_ensemble(all_volumes(a.data), a.member, a.out, a.device):
                print(f"fold {s['fold']}: {len(s['patients'])} patients segmented by the ensemble of "
                      f"{len(s['members'])} fold models (epochs {s['epochs']})", flush=True)
        except ValueError as exc:  # members without fold models, or with other folds or patients
            p.error(str(exc))
        return 0
    if a.command == "crossval-masks":
        import torch

        from raysegment.config import ModelConfig, TrainConfig, torch_threads

        if a.folds < 2 or any(not 0 <= f < a.folds for f in a.fold or []):
            p.error(f"--folds must be ≥ 2 and every --fold in 0..{a.folds - 1}")
        torch.set_num_threads(torch_threads(a.threads, 1))
        volumes = all_volumes(a.data)
        config = TrainConfig(data=str(a.data), model=ModelConfig(backbone=a.backbone, context_slices=a.context_slices),
                             epochs=a.epochs, time_budget_min=a.minutes, batch_size=a.batch_size, seed=a.seed,
                             max_steps_per_epoch=a.max_steps, threads_per_worker=a.threads)
        for fold in a.fold or range(a.folds):
            s = crossval_fold(volumes, fold, a.folds, config, a.device, a.out, seed=a.seed, keep_model=a.keep_models)
            print(f"fold {fold}: {len(s['patients'])} patients segmented after {len(s['history'])} epochs "
                  f"({s['minutes']:.1f} min)", flush=True)
        return 0
    return 2


if __name__ == "__main__":
    from raysegment.cli.diagnosis import main as _main  # the importable module's main (pickling, as the other CLIs)

    sys.exit(_main())
