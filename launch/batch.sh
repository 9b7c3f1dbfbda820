#!/usr/bin/env bash
# Offline batch generation across MPI ranks: prompts JSONL in, completions JSONL out.
#
#   launch/batch.sh [-n N] [--hostfile FILE] [--dry-run] IN.jsonl OUT.jsonl [-- <plexus generate args>]
#
# runs  mpirun ... plexus generate --prompts-file IN.jsonl --output OUT.jsonl --json <args>
# IN.jsonl: one {"prompt": "..."} or {"messages": [...]} per line; examples/prompts.jsonl is one:
#   launch/batch.sh examples/prompts.jsonl out.jsonl -- --max-tokens 32
# Options and environment (PLEXUS_VENV, PLEXUS_MPIRUN_ARGS, forwarded vars) as
# in launch/serve.sh.
set -euo pipefail
# shellcheck source=serve.sh
source "$(dirname "${BASH_SOURCE[0]}")/serve.sh"

opts=()
while (($#)) && [[ "$1" == -* && "$1" != -- ]]; do
  case "$1" in
    --dry-run) opts+=("$1"); shift ;;
    -h|--help) plexus_mpirun generate --help; exit 0 ;;
    *) opts+=("$1" "$2"); shift 2 ;;
  esac
done
(($# >= 2)) || { echo "usage: $0 [-n N] [--hostfile FILE] IN.jsonl OUT.jsonl [-- <plexus generate args>]" >&2; exit 2; }
in="$1" out="$2"; shift 2
[[ "${1:-}" == -- ]] && shift
[[ -r "$in" ]] || { echo "cannot read prompts file $in" >&2; exit 1; }

plexus_mpirun generate "${opts[@]}" -- --prompts-file "$in" --output "$out" --json "$@"
