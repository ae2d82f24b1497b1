"""An SSL4MIS source (../shared/acdc: volumes/*.h5, info.csv, train.txt/val.txt) laid out as an nnU-Net
user has it: ROOT/acdc (the official layout, Info.cfg without Group), ROOT/nnUNet_raw/Dataset027_ACDC
(imagesTr/labelsTr/dataset.json as nnU-Net v2's ACDC conversion writes them) and
ROOT/nnUNet_preprocessed/Dataset027_ACDC/splits_final.json (five folds by patient: a seeded shuffle,
fold k every fifth patient from k, as nnU-Net's conversion splits; not its draw, it had 100 patients).
With --test-from-val, the source's val patients go to imagesTs/labelsTs (the conversion writes no
labelsTs; the official testing folder's _gt files would go there).
    python jobs/nnunet-layout.py SOURCE ROOT [--test-from-val]   (ROOT must not exist)"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from raysegment.data.volumes import read_h5_volume, read_info_csv, with_info, write_official_patient


def main(src: Path, root: Path, test_from_val: bool = False) -> None:
    if root.exists():
        sys.exit(f"{root} exists: give a new ROOT")
    info = read_info_csv(src / "info.csv")
    patients = sorted({p[:10] for f in ("train.txt", "val.txt") for p in (src / f).read_text().split()})
    for p in patients:
        write_official_patient(root / "acdc", [with_info(read_h5_volume(src / "volumes" / f"{p}_{h}.h5"), info[p])
                                               for h in ("frame01", "frame02")], info[p])
    test = {p[:10] for p in (src / "val.txt").read_text().split()} if test_from_val else set()
    ds = root / "nnUNet_raw" / "Dataset027_ACDC"
    for f in sorted((root / "acdc" / "training").glob("patient*/*.nii.gz")):
        part = "Ts" if f.name[:10] in test else "Tr"
        kind, name = ("labels", f.name.replace("_gt", "")) if "_gt" in f.name else ("images", f.name.replace(".nii.gz", "_0000.nii.gz"))
        (ds / f"{kind}{part}").mkdir(parents=True, exist_ok=True)
        shutil.copy(f, ds / f"{kind}{part}" / name)
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "cineMRI"}, "file_ending": ".nii.gz",
                                                 "labels": {"background": 0, "RV": 1, "MLV": 2, "LVC": 3},
                                                 "numTraining": len(list((ds / "labelsTr").iterdir()))}))
    order = np.array([p for p in patients if p not in test])
    np.random.RandomState(1234).shuffle(order)
    cases = sorted(f.name[:-len(".nii.gz")] for f in (ds / "labelsTr").iterdir())
    folds = [set(order[k::5]) for k in range(5)]
    splits = [{"train": [c for c in cases if c[:10] not in f], "val": [c for c in cases if c[:10] in f]} for f in folds]
    (root / "nnUNet_preprocessed" / "Dataset027_ACDC").mkdir(parents=True)
    (root / "nnUNet_preprocessed" / "Dataset027_ACDC" / "splits_final.json").write_text(json.dumps(splits))
    print(f"{ds}: {len(patients) - len(test)} patients in imagesTr, {len(test)} in imagesTs; fold 0 val: "
          f"{' '.join(sorted(folds[0]))}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 2:
        sys.exit(__doc__)
    main(Path(args[0]), Path(args[1]), "--test-from-val" in sys.argv)
