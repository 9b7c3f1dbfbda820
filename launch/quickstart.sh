#!/usr/bin/env bash
# Fresh machine to generated text: set up the venv, then run a 2-rank generation on the
# embedded demo model (a tiny Llama with random weights, created once in ~/.cache/plexus).
#
#   launch/quickstart.sh ["prompt"]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh
prompt="${1:-The GPU in the small lab}"
args=(generate --prompt "$prompt" --max-tokens 48 --temperature 0.8 --top-k 40 --seed 7)
echo "quickstart: mpirun -n 2 plexus ${args[*]}" >&2
mpirun -n 2 --bind-to none plexus "${args[@]}"
