"""What the diagnosis loses when height and weight are unknown (nnU-Net's layout, an anonymised DICOM
patient module), on masks of every patient of the shards: repeated stratified 5-fold CV (×10) of
the classifier fitted on features with the true BSA, each held-out patient scored three ways — with
its BSA; without it, each indexed feature at its training median (before 2026-12-07); without it,
its volumes indexed by the training patients' median BSA (since). Then the shipped classifier on all
patients and on the val split, the same three ways.
    python jobs/diagnosis-without-bsa.py MASKS SHARDS [CACHE]
MASKS: `reference` (the shards' own labels) or a model (shipped:densenet121, a file, models:/…)
whose masks are read from, or saved to, the folder CACHE. A model's train patients were in its
training, so its masks of them are cleaner than an unseen patient's."""
import sys

import numpy as np
from sklearn.model_selection import RepeatedStratifiedKFold

from raysegment.analysis import diagnosis as D
from raysegment.data.dataset import all_volumes
from raysegment.data.prepare import load_manifest


def main(masks_of: str, shards: str, cache: str | None = None) -> None:
    manifest, volumes = load_manifest(shards), all_volumes(shards)
    shipped = D.load("shipped")
    if masks_of == "reference":
        masks = {(v.patient, v.phase): v.label for v in volumes}
    else:
        from raysegment.inference.predictor import Predictor, predicted_masks

        masks = predicted_masks(Predictor.load(masks_of), volumes, cache)
    meta = manifest["patients"]
    names, with_bsa, y = D.patient_features(volumes, masks, meta, shipped.basal_rv)
    _, medians, _ = D.patient_features(volumes, masks, {}, shipped.basal_rv)
    y, ways = np.array(y), ("with BSA", "no BSA: each feature's median", "no BSA: median BSA")
    scores: dict[str, list[float]] = {w: [] for w in ways}
    for train, test in RepeatedStratifiedKFold(n_splits=5, n_repeats=10, random_state=0).split(with_bsa, y):
        model = D.fit(with_bsa[train], y[train].tolist())
        bsa = D.median_bsa_m2([names[i] for i in train], meta)
        _, indexed, _ = D.patient_features(volumes, masks, {}, shipped.basal_rv, bsa)
        for way, x in zip(ways, (with_bsa, medians, indexed)):
            scores[way].append(float(np.mean(np.array(model.predict(x[test])) == y[test])))
    _, indexed, _ = D.patient_features(volumes, masks, {}, shipped.basal_rv, shipped.bsa_m2)
    val = [i for i, n in enumerate(names) if n in set(manifest["splits"].get("val", []))]
    print(f"masks: {masks_of}; {len(names)} patients")
    for way, x in zip(ways, (with_bsa, medians, indexed)):
        repeats = np.array(scores[way]).reshape(10, 5).mean(1)
        right = np.array(shipped.predict(x)) == y
        print(f"  {way:30s} CV accuracy {repeats.mean():.3f} ± {repeats.std():.3f}   shipped classifier: "
              f"all {right.sum()}/{len(y)}, val {right[val].sum()}/{len(val)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
