#!/usr/bin/env bash
# Issue 26 on one GPU lease (about 9 min on one H200), for a machine with torch but no Ray or MLflow:
#   1. the environment (GPU, driver, torch; which of raysegment's dependencies are missing there);
#   2. the paired comparison, both arms side by side on the one GPU, ARM_MIN minutes each (default 3):
#        A  today's defaults (batch 8, lr 2e-3)
#        B  batch 64, lr 2e-3 x sqrt(8) = 5.66e-3 (a GPU's recipe: at batch 8 the step is bound by the host)
#      MobileNetV2 from random weights, seed 0, `python -m raysegment.train --local cuda`, each arm's last
#      epoch scored on the 10 val patients by the training loop's own validation;
#   3. the rule, written before any lease (docs/results.md, "Fifth round"): B is adopted iff its val mean is
#      not below A's. Then one final run of B's recipe, alone on the GPU, FINAL_MIN minutes (default 4.5),
#      seed 0: its last epoch is the file that replaces mobilenet_v2.safetensors, whatever its val Dice
#      (never an arm). If A wins there is no final run: the shipped file stays.
# Run from the repository root there:  bash jobs/gpu-train.sh BUNDLE OUT [ARM_MIN] [FINAL_MIN]
#   BUNDLE: `python -m raysegment.diagnosis pack --data SHARDS --out .gpu/acdc80.npz` made here (it records
#           train/val; 46 MiB for ACDC's 80). The checkout travels without raysegment/shipped/*.safetensors
#           (see jobs/gpu-lease.sh) so that code and bundle stay under 64 MiB together.
#   OUT:    env.txt, lease.txt (the arms' and the final run's `done:` lines, the decision), logs.tar.gz,
#           arm-a.safetensors, arm-b.safetensors and, if B won, mnv2-gpu.safetensors (13 MB each).
# Try it on a CPU first:  LEASE_DEVICE=cpu LEASE_TRAIN_ARGS="--image-size 64 --crop-size 64 --decoder-width 8" \
#                         bash jobs/gpu-train.sh /tmp/small.npz /tmp/lease-out 0.2 0.2
# Back here: score the files with `python -m raysegment.report evaluate --model FILE --data SHARDS` (both splits,
# HD95 too), then `jobs/ship.sh` the final file's folder as for a CPU run.
set -uo pipefail
bundle="$1"; out="$2"; arm_min="${3:-3}"; final_min="${4:-4.5}"
work="${LEASE_WORK:-/tmp/lease-train}"
dev="${LEASE_DEVICE:-cuda}"
mkdir -p "$work" "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python3}"
# shellcheck source=jobs/lease-common.sh
. "$(dirname "$0")/lease-common.sh"
say() { echo "[lease $(date -u +%T)] $*" | tee -a "$out/lease.txt"; }
# shellcheck disable=SC2086  # LEASE_TRAIN_ARGS is a list of options
run() {  # NAME MINUTES [train options...]: one local run; its log in $work, its done: line echoed
    local name="$1" minutes="$2"; shift 2
    "$py" -m raysegment.train --local "$dev" --data "$bundle" --backbone mobilenet_v2 --epochs 1000 \
        --minutes "$minutes" --seed 0 --threads 4 --storage "$work" --name "$name" ${LEASE_TRAIN_ARGS:-} "$@" \
        > "$work/$name.log" 2>&1
    grep '^done:' "$work/$name.log" || { echo "$name failed:"; tail -5 "$work/$name.log"; }
}
b_recipe=(--batch-size 64 --lr 5.66e-3)  # arm B's, and the final run's if B is adopted
mean_of() { sed -n 's/.* mean \([0-9.]*\);.*/\1/p' "$work/$1.log"; }

say "environment"
lease_environment "$out/env.txt"

say "arms A (defaults) and B (${b_recipe[*]}), side by side, $arm_min min each"
run arm-a "$arm_min" > "$work/arm-a.done" &
run arm-b "$arm_min" "${b_recipe[@]}" > "$work/arm-b.done" &
wait
cat "$work/arm-a.done" "$work/arm-b.done" | tee -a "$out/lease.txt"
a=$(mean_of arm-a); b=$(mean_of arm-b)

if [ -n "$a" ] && [ -n "$b" ] && awk -v a="$a" -v b="$b" 'BEGIN { exit !(b >= a) }'; then
    say "B adopted (val mean $b against A's $a): final run, $final_min min alone"
    run mnv2-gpu "$final_min" "${b_recipe[@]}" | tee -a "$out/lease.txt"
else
    say "B not adopted (val mean ${b:-none} against A's ${a:-none}): no final run, the shipped file stays"
fi

cp "$work"/*.safetensors "$out"/ 2>/dev/null
tar czf "$out/logs.tar.gz" -C "$work" --exclude='*.safetensors' .
say "done"
