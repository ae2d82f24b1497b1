# Sourced by jobs/long-runs.sh and jobs/ship.sh: where the long runs live, and when one has ended.
# shellcheck shell=bash
root="$HOME/raysegment-runs"
ended() { grep -q "^== exit 0" "$root/$1.log" 2>/dev/null; }  # its budget ran out (Ctrl-C exits 130)
