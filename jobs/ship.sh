#!/usr/bin/env bash
# Ship an ended long run and refit what depends on the shipped segmenters, in one go.
#   jobs/ship.sh NAME      run NAME's last epoch (jobs/long-runs.sh; it must have ended) becomes
#                          raysegment/shipped/<its backbone>.safetensors (SHA256SUMS updated); the
#                          basal ES check in diagnosis.json is refitted on the shipped pair's own masks
#                          of the train patients (the classifier kept); the learning curves and overlays in
#                          shipped/figures (docs/figures) redrawn, with each model's Dice by level of the
#                          heart on train and val (levels_<backbone>.png); then the tables below
#   jobs/ship.sh --tables  only the tables: val Dice (report evaluate) and val clinical indices with no
#                          basal check and with the shipped one (report clinical) of each shipped model
#                          and of their ensemble; nothing in raysegment/shipped changes
# Runs the checkout's code (what users get), not a run's snapshot; the shards are ~/raysegment-runs/shards.
# Output: ~/raysegment-runs/ship-<UTC time>/ (the diagnosis file before and after with the basal check's
# comparison table, the masks cache, one folder per model; 29 min on one AVX2 core, 2026-12-04,
# before `report evaluate` shared its val masks with `report clinical`).
# Commit raysegment/shipped/ afterwards (if a step fails: `git checkout raysegment/shipped` puts it back);
# docs/results.md and shipped/README.md take the tables.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=jobs/runs-common.sh
. "$repo/jobs/runs-common.sh"  # root, ended
shipped="$repo/raysegment/shipped"
shards="$root/shards"
[ $# -eq 1 ] || { usage; exit 2; }
[ -d "$shards" ] || { echo "no shards in $shards (jobs/long-runs.sh start prepares them)" >&2; exit 2; }
out="$root/ship-$(date -u +%Y%m%dT%H%M%SZ)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if [ "$1" != "--tables" ]; then
    name="$1"
    ended "$name" || { echo "run $name has not ended (see $root/$name.log)" >&2; exit 2; }
    backbone="$(python -c 'import sys
from raysegment.model.checkpoint import last_checkpoint, read_config
print(read_config(last_checkpoint(sys.argv[1])).model.backbone)' "$root/$name")"
    mkdir -p "$out"
    cp "$shipped/diagnosis.json" "$out/diagnosis-before.json"
    python -m raysegment.weights export "$root/$name" --out "$shipped/$backbone.safetensors"
    python -m raysegment.diagnosis basal --data "$shards" --model shipped:mobilenet_v2 --model shipped:densenet121 \
        --ensemble --diagnosis "$out/diagnosis-before.json" --mask-cache "$out/masks" --out "$out/diagnosis.json"
    cp "$out/diagnosis.json" "$shipped/diagnosis.json"  # its comparison table stays in $out (diagnosis.basal.md)
    python -m raysegment.report figures --model mobilenet_v2="$shipped/mobilenet_v2.safetensors" \
        --model densenet121="$shipped/densenet121.safetensors" --data "$shards" --out "$shipped/figures"
    for bb in mobilenet_v2 densenet121; do
        python -m raysegment.report evaluate --model "shipped:$bb" --data "$shards" --splits train val \
            --by-level --mask-cache "$out/masks" --out "$out/levels-$bb" > /dev/null
        cp "$out/levels-$bb/levels.png" "$shipped/figures/levels_$bb.png"
    done
fi

mkdir -p "$out"
for models in "shipped:mobilenet_v2" "shipped:densenet121" "shipped:mobilenet_v2 shipped:densenet121"; do
    tag="$(echo "$models" | sed 's/shipped://g; s/ /+/g')"
    args=(); for m in $models; do args+=(--model "$m"); done
    python -m raysegment.report evaluate "${args[@]}" --data "$shards" --splits val --by-level \
        --mask-cache "$out/masks" --out "$out/$tag"  # the val masks the clinical tables below read back
    for check in none shipped; do
        python -m raysegment.report clinical "${args[@]}" --data "$shards" --basal-check "$check" \
            --diagnosis shipped --mask-cache "$out/masks" --out "$out/$tag/clinical-$check"
    done
done
echo "tables in $out"
