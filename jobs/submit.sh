#!/usr/bin/env bash
# Submit a raysegment stage to a Ray cluster's job server (token auth).
#   jobs/submit.sh tune  --backbone densenet121 --data /shared/shards --mlflow-uri http://mlflow:5000
#   jobs/submit.sh train --backbone mobilenet_v2 --data /shared/shards --storage /shared/runs
#   jobs/submit.sh infer --model models:/raysegment-densenet121@champion --input /shared/new --output /shared/seg
# Needs RAY_ADDRESS (e.g. http://127.0.0.1:8265) and the cluster token: RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH.
set -euo pipefail
stage="$1"; shift
case "$stage" in tune|train|infer|prepare) ;; *) echo "usage: $0 tune|train|infer|prepare ARGS..." >&2; exit 2;; esac
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
here="$(cd "$(dirname "$0")" && pwd)"
exec ray job submit --runtime-env "$here/runtime_env.yaml" -- python -m "raysegment.$stage" "$@"
