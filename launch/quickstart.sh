#!/usr/bin/env bash
# Fresh machine to generated text: set up the venv, then run a 2-rank generation on the
# embedded demo model (a tiny Llama with random weights, created once in ~/.cache/plexus).
#
#   launch/quickstart.sh ["prompt"]
set -euo pipefail
prompt="${1:-The GPU in the small lab}"
cd "$(dirname "$0")/.."
source launch/setup.sh ""   # no extras (and not this script's arguments)
args=(generate --prompt "$prompt" --max-tokens 48 --temperature 0.8 --top-k 40 --seed 7)
mpi=(-n 2 --bind-to none)
(($(nproc) < 2)) && mpi+=(--oversubscribe)   # two ranks on a one-core machine
echo "quickstart: mpirun ${mpi[*]} plexus ${args[*]}" >&2
mpirun "${mpi[@]}" plexus "${args[@]}"
