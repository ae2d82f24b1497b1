#!/usr/bin/env bash
# Long training runs as background compute on one machine, across sittings that end every process.
#   jobs/long-runs.sh start NAME TRAIN-ARGS...  start run NAME, or resume it (the same command)
#   jobs/long-runs.sh resume                    resume every run started here that has not ended
#   jobs/long-runs.sh pause NAME                Ctrl-C its driver: the run's clock stops, checkpoints stay
#   jobs/long-runs.sh status                    each run's last epoch line
#   jobs/long-runs.sh finish NAME               an ended run's last epoch: NAME.safetensors, its Dice
#                                               table and clinical report in NAME-report/
# Everything lives in ~/raysegment-runs: shards (prepared from ../shared/acdc on first use), one frozen
# code snapshot per run (later edits to the checkout never change what a run computes), NAME.log,
# NAME.args. Runs use one worker with one torch thread, so two run side by side on 2 cores.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=jobs/runs-common.sh
. "$repo/jobs/runs-common.sh"  # root, ended
mkdir -p "$root"

# a run's python process (anchored: the bash -c wrapper that logs its start and exit matches too)
driver_pid() { pgrep -f "^python -m raysegment.train .*--name $1( |$)" | head -1 || true; }

start() {
    local name="$1"; shift
    if [ -f "$root/$name.args" ]; then
        [ $# -eq 0 ] || [ "$*" = "$(cat "$root/$name.args")" ] || { echo "run $name began with: $(cat "$root/$name.args")" >&2; exit 2; }
        set -- $(cat "$root/$name.args")
    else
        echo "$*" > "$root/$name.args"
        git -C "$repo" rev-parse --short HEAD > "$root/$name.commit"
    fi
    local commit code; commit="$(cat "$root/$name.commit")"; code="$root/code-$commit"
    [ -d "$code" ] || { mkdir -p "$code"; git -C "$repo" archive "$commit" | tar -x -C "$code"; }
    if [ ! -d "$root/shards" ]; then
        PYTHONPATH="$code" python -m raysegment.prepare --source "$repo/../shared/acdc" --out "$root/shards"
    fi
    if [ -n "$(driver_pid "$name")" ]; then echo "run $name is already running"; return; fi
    # shellcheck disable=SC2086
    (cd "$code" && PYTHONPATH="$code" nohup bash -c "echo \"== start \$(date -u +%FT%TZ) code $commit\"; \
        python -m raysegment.train --data $root/shards --workers 1 --threads 1 --epochs 1000 --storage $root --name $name $*; \
        echo \"== exit \$? \$(date -u +%FT%TZ)\"" >> "$root/$name.log" 2>&1 &)
    echo "run $name: started (code $commit); log $root/$name.log"
}

case "${1:-}" in
    start) shift; [ $# -ge 1 ] || { echo "usage: $0 start NAME TRAIN-ARGS..." >&2; exit 2; }; start "$@" ;;
    resume)
        for f in "$root"/*.args; do
            [ -e "$f" ] || continue
            name="$(basename "$f" .args)"
            if ended "$name"; then echo "run $name: ended"; else start "$name"; sleep 20; fi
        done ;;
    pause)
        pid="$(driver_pid "${2:?NAME}")"
        if [ -n "$pid" ]; then kill -INT "$pid"; echo "run $2: Ctrl-C sent"; else echo "run $2 is not running"; fi ;;
    status)
        for f in "$root"/*.log; do
            [ -e "$f" ] || continue
            echo "$(basename "$f" .log): $(grep -E '^\[raysegment\] epoch|^== ' "$f" | tail -n 1)"
        done ;;
    finish)
        name="${2:?NAME}"; out="$root/$name-report"
        ended "$name" || { echo "run $name has not ended" >&2; exit 2; }
        code="$root/code-$(cat "$root/$name.commit")"
        export PYTHONPATH="$code"
        python -m raysegment.weights export "$root/$name" --out "$root/$name.safetensors"
        python -m raysegment.report evaluate --model "$root/$name.safetensors" --data "$root/shards" --out "$out"
        python -m raysegment.report clinical --model "$root/$name.safetensors" --data "$root/shards" \
            --basal-check shipped --diagnosis shipped --out "$out/clinical" ;;
    *) usage; exit 2 ;;
esac
