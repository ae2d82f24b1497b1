# Sourced by jobs/long-runs.sh and jobs/ship.sh: where the long runs live, when one has ended, and
# the usage text (the script's comment block under its #! line, so no line range is counted by hand).
# shellcheck shell=bash
root="$HOME/raysegment-runs"
ended() { grep -q "^== exit 0" "$root/$1.log" 2>/dev/null; }  # its budget ran out (Ctrl-C exits 130)
usage() { sed -n '2,/^[^#]/{/^#/p}' "$0"; }
