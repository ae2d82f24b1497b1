#!/usr/bin/env bash
# Score models the way the held-out patients are scored: the val patients of an SSL4MIS source
# written in the official ACDC layout (int16 NIfTI, spacing in the header, Info.cfg without its
# Group line), segmented by `python -m raysegment.infer` (its done line and report.md give the mean
# Dice against the reference masks), then its results.csv scored: LV/RV EF MAE and bias (%) against the
# _gt masks' EFs, diagnosis right.
#   jobs/official-val.sh SOURCE OUT MODEL [MODEL ...]   e.g.
#   jobs/official-val.sh ../shared/acdc /tmp/official shipped:densenet121
# SOURCE: train.txt/val.txt, volumes/*.h5 and info.csv as ../shared/acdc has them. A second MODEL
# makes an ensemble. The figures should equal `jobs/ship.sh --tables`' val rows (report evaluate,
# report clinical --basal-check shipped --diagnosis shipped) up to int16 rounding.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 2; }
src="$1" out="$2"; shift 2
for f in info.csv val.txt volumes; do
    [ -e "$src/$f" ] || { echo "$src/$f missing: SOURCE must be an SSL4MIS folder like ../shared/acdc" >&2; exit 2; }
done
[ ! -e "$out" ] || { echo "$out exists: give a new OUT folder" >&2; exit 2; }
models=(); for m in "$@"; do models+=(--model "$m"); done
export RAY_USAGE_STATS_ENABLED=0
python - "$src" "$out/acdc" <<'EOF'
import sys
from pathlib import Path
from raysegment.data.volumes import read_h5_volume, read_info_csv, with_info, write_official_patient
src, out = Path(sys.argv[1]), Path(sys.argv[2])
info = read_info_csv(src / "info.csv")
patients = (src / "val.txt").read_text().split()
for p in patients:
    volumes = [with_info(read_h5_volume(src / "volumes" / f"{p}_{h5}.h5"), info[p]) for h5 in ("frame01", "frame02")]
    write_official_patient(out, volumes, info[p])
print(f"wrote {len(patients)} patients under {out / 'training'}")
EOF
python -m raysegment.infer "${models[@]}" --input "$out/acdc" --output "$out/results"
python - "$src" "$out" <<'EOF'
import sys
from pathlib import Path
import numpy as np, pandas as pd
from raysegment.analysis.clinical import patient_indices
from raysegment.data.volumes import read_info_csv
from raysegment.io.studies import gt_for, read_study
src, out = Path(sys.argv[1]), Path(sys.argv[2])
groups = {p: r["group"] for p, r in read_info_csv(src / "info.csv").items()}
rows = pd.read_csv(out / "results" / "results.csv")
rows["patient"] = rows["study"].str.extract(r"(patient\d{3})")[0]
err, right = {"lv": [], "rv": []}, 0
for p, g in rows.groupby("patient"):
    gt = {r.phase: read_study(gt_for(Path(r.study))) for r in g.itertuples()}  # (image, frames, zooms x, y, z)
    ref = patient_indices(*(gt[ph][1][0].astype(np.uint8) for ph in ("ED", "ES")), gt["ED"][2][::-1])
    for s in err:
        err[s].append(g[f"{s}_ef_pct"].iloc[0] - ref[f"{s}_ef_pct"])
    right += g["diagnosis"].iloc[0] == groups[p]
for s, e in err.items():
    print(f"{s.upper()} EF MAE / bias (%): {np.mean(np.abs(e)):.2f} / {np.mean(e):+.2f}")
print(f"diagnosis: {right}/{rows['patient'].nunique()} right")
EOF
