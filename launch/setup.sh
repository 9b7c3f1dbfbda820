#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install Plexus into it.
#
#   source launch/setup.sh [extras]      e.g. `source launch/setup.sh test`
#
# PLEXUS_VENV picks the venv (default: <repo>/.venv). torch is installed first only when the
# venv has none, pinned to the CPU wheel 2.13.0; a CUDA or ROCm torch you installed yourself
# is never replaced (the package asks only for torch>=2.1,<3).
set -euo pipefail
PLEXUS_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PLEXUS_VENV="${PLEXUS_VENV:-$PLEXUS_REPO/.venv}"
extras="${1:-}"

if [[ ! -x "$PLEXUS_VENV/bin/python" ]]; then
  echo "setup: creating virtual environment $PLEXUS_VENV" >&2
  python3 -m venv "$PLEXUS_VENV"
  "$PLEXUS_VENV/bin/python" -m pip install -q --upgrade pip
fi
py="$PLEXUS_VENV/bin/python"
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (CPU wheel)" >&2
  "$py" -m pip install -q "torch==2.13.0"
fi
spec="$PLEXUS_REPO${extras:+[$extras]}"
echo "setup: installing plexus${extras:+[$extras]} into $PLEXUS_VENV" >&2
"$py" -m pip install -q -e "$spec"

export PATH="$PLEXUS_VENV/bin:$PATH"
export OPAL_PREFIX="${OPAL_PREFIX:-$PLEXUS_VENV}"   # the pip Open MPI finds its help files
if ((EUID == 0)); then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
