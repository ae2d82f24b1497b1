#!/usr/bin/env bash
# One unattended GPU lease (about 8 min on one H200), for a machine with torch but no Ray or MLflow:
#   1. the environment (GPU, driver, torch; which of raysegment's dependencies are missing there);
#   2. the bare training loop of both backbones at batch 8 and 64 (`bench train --bare-only --gpu`):
#      slices/s, peak memory, the GPU's busy share -- the Ray-free part of `bench gpu-smoke`;
#   3. cross-validated fold models for the diagnosis classifier: 5 folds x both backbones, all ten
#      side by side, today's training defaults, FOLD_MINUTES each (`diagnosis crossval-masks --keep-models`),
#      then each fold's patients segmented by its two models' ensemble (`diagnosis crossval-ensemble`);
#   4. GPU vs CPU masks of one fold model on its held-out volumes (share of voxels equal).
# Run from the repository root there:  jobs/gpu-lease.sh BUNDLE OUT [FOLD_MINUTES]
# As run on 2026-12-04 (device tool, `.gpu` carried, 523 s):  bash jobs/gpu-lease.sh .gpu/acdc80.npz "$OUT" 4.3
#   BUNDLE: `python -m raysegment.diagnosis pack --data SHARDS --out BUNDLE` made here (LZMA, 46 MiB for ACDC's 80)
#   OUT:    gets env.txt, bench.jsonl, agreement.json, cv.tar.gz (the three fold-mask folders and their
#           JSON, no weights) and logs.tar.gz -- few files, as a lease brings back at most 8.
# What travels: the checkout and the carried bundle together must stay under 64 MiB, so the checkout went
# without raysegment/shipped/*.safetensors (41 MB; `git checkout -b lease && git rm raysegment/shipped/*.safetensors
# && git commit -m lease`, back with `git checkout main`); nothing in the lease needs them.
# Back here: tar xzf cv.tar.gz, then `python -m raysegment.diagnosis fit --masks ensemble ...` (docs/clinical.md).
set -uo pipefail
bundle="$1"; out="$2"; minutes="${3:-4.5}"
work="${LEASE_WORK:-/tmp/lease}"
dev="${LEASE_DEVICE:-cuda}"    # cpu: try the whole script on a CPU first, with LEASE_FOLD_ARGS="--max-steps 2"
gpu=(); [ "$dev" = cuda ] && gpu=(--gpu)
mkdir -p "$work" "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python3}"
# shellcheck source=jobs/lease-common.sh
. "$(dirname "$0")/lease-common.sh"
say() { echo "[lease $(date -u +%T)] $*"; }

say "environment"
lease_environment "$out/env.txt"

say "bare loop, both backbones, batch 8 and 64"
# 40 s each cut off both MobileNetV2 lines on 2026-12-04 (a fresh machine's first imports and cuDNN's
# kernel search); the DenseNet-121 ones finished. Where the lease allows, give each 90 s.
for b in mobilenet_v2 densenet121; do
    for n in 8 64; do
        timeout 40 "$py" -m raysegment.bench train --data "$bundle" --bare-only "${gpu[@]}" --backbone "$b" --batch-size "$n" \
            --steps 20 2>>"$work/bench.err" | tee -a "$out/bench.txt" | grep '^{' >> "$out/bench.jsonl"
    done
done

say "fold models: 5 folds x 2 backbones side by side, $minutes min each"
for b in mobilenet_v2 densenet121; do
    for k in 0 1 2 3 4; do
        "$py" -m raysegment.diagnosis crossval-masks --data "$bundle" --out "$work/$b" --folds 5 --fold "$k" \
            --backbone "$b" --minutes "$minutes" --epochs 1000 --threads 1 --device "$dev" --keep-models ${LEASE_FOLD_ARGS:-} \
            > "$work/fold-$b-$k.log" 2>&1 &
    done
done
wait
grep -h "segmented after" "$work"/fold-*.log

say "ensemble fold masks"
"$py" -m raysegment.diagnosis crossval-ensemble --data "$bundle" --member "$work/mobilenet_v2" \
    --member "$work/densenet121" --out "$work/ensemble" --device "$dev" 2>&1 | tee "$work/ensemble.log"

say "GPU vs CPU masks (MobileNetV2 fold 0, its held-out volumes)"
timeout 60 "$py" - "$bundle" "$work/mobilenet_v2" "$out/agreement.json" "$dev" <<'EOF'
import json, sys
from pathlib import Path
from raysegment.data.dataset import load_bundle
from raysegment.config import PredictConfig
from raysegment.inference.predictor import Predictor, predict_volumes
from raysegment.model.weights import load_weights_file
bundle, folder, dst, gpu = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
held = set(json.loads((folder / "fold0.json").read_text())["patients"])
volumes = [v for v in load_bundle(bundle) if v.patient in held]
masks, precision = {}, {}
for device in (gpu, "cpu"):
    loaded = load_weights_file(folder / "fold0.safetensors", device)
    predictor = Predictor(loaded, PredictConfig(device=device, largest_component=False))
    masks[device] = [m for _, m in predict_volumes(predictor, volumes)]
    precision[device] = predictor.config.precision
equal = sum(int((a == b).sum()) for a, b in zip(masks[gpu], masks["cpu"]))
total = sum(a.size for a in masks["cpu"])
result = {"volumes": len(volumes), "voxels": total, "equal_share": equal / total, "precision": precision}
dst.write_text(json.dumps(result, indent=1))
print(json.dumps(result))
EOF

say "packing"
(cd "$work" && tar czf "$out/cv.tar.gz" --exclude='*.safetensors' mobilenet_v2 densenet121 ensemble)
(cd "$work" && tar czf "$out/logs.tar.gz" ./*.log bench.err 2>/dev/null)
ls -la "$out"
say "done"
