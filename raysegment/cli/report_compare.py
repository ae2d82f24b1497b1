"""``python -m raysegment.report compare``: two models, mask folders or written records scored on the
same patients, paired. Top layer: may import every stage.
"""

from __future__ import annotations

import sys
from pathlib import Path

from raysegment.cli.report_masks import clinical_context, given_masks, model_masks
from raysegment.data.masks import is_mask_folder
from raysegment.inference.evaluation import evaluate, evaluate_masks
from raysegment.reporting.report import CLINICAL_INDICES, clinical_records, read_clinical_csv


def _clinical_sides(a) -> tuple[list[dict], list[dict]]:
    """Both sides of ``report compare --metric clinical``: a clinical.csv as written, or the model's
    masks measured now (volumes, metadata and basal check loaded once for both)."""
    sides, context = [], None
    for refs in (a.a, a.b):
        if len(refs) == 1 and refs[0].endswith(".csv"):
            sides.append(read_clinical_csv(Path(refs[0])))
            continue
        if len(refs) == 1 and refs[0].endswith(".json"):
            raise ValueError(f"{refs[0]} holds Dice, not clinical indices: give the model, or the clinical.csv "
                             "of `report clinical --out`")
        if a.data is None:
            raise ValueError(f"--data is needed to measure {' + '.join(refs)}")
        context = context or clinical_context(a)
        volumes, patients, basal = context
        masks = (given_masks(Path(refs[0]), volumes, a.data)[0] if len(refs) == 1 and is_mask_folder(refs[0])
                 else model_masks(refs, volumes, a))
        sides.append(clinical_records(volumes, masks, patients, basal))
    return sides[0], sides[1]


def _side_records(refs: list[str], a) -> tuple[list[dict], list[dict] | None]:
    """One side of ``report compare``: (Dice records, level records with ``--by-level`` else None) of a
    records.json as written (its levels.json beside it), or of the model scored now."""
    import json

    if len(refs) == 1 and refs[0].endswith(".json"):
        records = json.loads(Path(refs[0]).read_text())
        keys = {"split", "patient", "phase", "class", "dice"}
        if not isinstance(records, list) or not all(isinstance(r, dict) and keys <= r.keys() for r in records):
            raise ValueError(f"{refs[0]} is not the records.json of `report evaluate --out`")
        levels = None
        if a.by_level:
            beside = Path(refs[0]).with_name("levels.json")
            if not beside.is_file():
                raise ValueError(f"no levels.json beside {refs[0]}: write it with `report evaluate --by-level --out`")
            levels = [{k: float("nan") if v is None else v for k, v in r.items()}  # strict JSON wrote NaN as null
                      for r in json.loads(beside.read_text()) if r["split"] in a.splits]
        return [r for r in records if r["split"] in a.splits], levels
    if len(refs) == 1 and refs[0].endswith(".csv"):
        raise ValueError(f"{refs[0]} holds clinical indices, not Dice: add --metric clinical")
    if a.data is None:
        raise ValueError(f"--data is needed to score {' + '.join(refs)}")
    levels = [] if a.by_level else None
    if len(refs) == 1 and is_mask_folder(refs[0]):
        return evaluate_masks(refs[0], a.data, a.splits, levels), levels
    records = evaluate(model_ref=refs, shards=a.data, splits=a.splits, tracking_uri=a.mlflow_uri,
                       mask_cache=a.mask_cache, levels=levels)
    return records, levels


def compare_command(a) -> int:
    """``report compare``: paired Dice or clinical errors of A against B, a table, and with ``--out`` a
    plot, compare.md and compare.json → the exit status."""
    import json

    from raysegment.analysis import paired
    from raysegment.io.files import json_safe
    from raysegment.reporting import paired as tables

    labels = [a.label_a or " + ".join(a.a), a.label_b or " + ".join(a.b)]
    clinical = a.metric == "clinical"
    try:
        paired.check_resamples(a.resamples)  # before any model runs
        if a.basal_check != "none" and not clinical:
            raise ValueError("--basal-check applies to --metric clinical only")
        if a.by_level and clinical:
            raise ValueError("--by-level applies to --metric dice only")
        levels = None
        if clinical:
            result = paired.paired_errors(*_clinical_sides(a), CLINICAL_INDICES, resamples=a.resamples, seed=a.seed)
        else:
            (records_a, levels_a), (records_b, levels_b) = _side_records(a.a, a), _side_records(a.b, a)
            result = paired.paired_dice(records_a, records_b, resamples=a.resamples, seed=a.seed)
            if a.by_level:
                levels = paired.paired_levels(levels_a, levels_b, resamples=a.resamples, seed=a.seed)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = (tables.paired_errors_table if clinical else tables.paired_table)(result, *labels)
    if levels is not None:
        table += "\n\n" + tables.paired_level_table(levels, *labels)
        result = {**result, "levels": levels}
    print(table)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        png = (tables.paired_errors_plot if clinical else tables.paired_plot)(result, a.out / "paired.png", *labels)
        (a.out / "compare.md").write_text(f"{table}\n\n![paired {a.metric}]({png.name})\n")
        saved = json_safe({"a": labels[0], "b": labels[1], "metric": a.metric, **result})  # an empty EF is null
        (a.out / "compare.json").write_text(json.dumps(saved, indent=1, allow_nan=False))
        print(f"wrote {a.out / 'compare.md'}, {png}")
    return 0
