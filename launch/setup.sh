#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install Plexus into it.
#
#   source launch/setup.sh [extras]      e.g. `source launch/setup.sh test` or `... test,bench`
#
# PLEXUS_VENV picks the venv (default: <repo>/.venv). torch is installed first only when the
# venv has none: `pip install torch==2.13.0` (on Linux x86 PyPI serves that version with its
# CUDA libraries; put the CPU build in first with `pip install torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cpu` if you want the small one). A CUDA or ROCm torch you
# installed yourself is never replaced (the package asks only for torch>=2.1,<3).
#
# Plexus is installed in editable mode once; later runs install again only when what decides
# the install (setup.cfg, pyproject.toml, the version, the extras asked for) differs from the
# stamp the last install left in the venv, so a second run prints nothing.
#
# Callers pass their extras explicitly (a sourced script would otherwise see the caller's own
# arguments, e.g. a prompt, as extras).
set -euo pipefail
PLEXUS_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PLEXUS_VENV="${PLEXUS_VENV:-$PLEXUS_REPO/.venv}"
extras="${1:-}"
if [[ ! "$extras" =~ ^[a-z0-9_,-]*$ ]]; then
  echo "setup: extras must be names like 'test' or 'test,bench', got '$extras'" >&2
  return 2 2>/dev/null || exit 2
fi

if [[ ! -x "$PLEXUS_VENV/bin/python" ]]; then
  echo "setup: creating virtual environment $PLEXUS_VENV" >&2
  python3 -m venv "$PLEXUS_VENV"
  "$PLEXUS_VENV/bin/python" -m pip install -q --upgrade pip
fi
py="$PLEXUS_VENV/bin/python"
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0" >&2
  "$py" -m pip install -q "torch==2.13.0"
fi

# The stamp: a hash of what decides the install, then the extras installed with it.
stamp_file="$PLEXUS_VENV/.plexus-install"
want_hash="$("$py" -c 'import hashlib, sys
h = hashlib.sha256(sys.argv[1].encode())
for f in sys.argv[2:]:
    h.update(open(f, "rb").read())
print(h.hexdigest())' "$PLEXUS_REPO" "$PLEXUS_REPO"/{setup.cfg,pyproject.toml,plexus/__init__.py})"
have_hash="" have_extras=""
[[ -r "$stamp_file" ]] && read -r have_hash have_extras < "$stamp_file" || true
missing=""
for e in ${extras//,/ }; do
  [[ ",$have_extras," == *",$e,"* ]] || missing+="$e,"
done
installed_here() {  # plexus imports from this checkout (not another clone, not a stale copy)
  (cd / && "$py" -c "import plexus, sys; sys.exit(not plexus.__file__.startswith(sys.argv[1]))" \
    "$PLEXUS_REPO/plexus/") 2>/dev/null
}
if [[ "$have_hash" != "$want_hash" || -n "$missing" ]] || ! installed_here; then
  all="$extras"
  [[ "$have_hash" == "$want_hash" && -n "$have_extras" ]] && all="${have_extras}${extras:+,$extras}"
  all="$(tr ',' '\n' <<< "$all" | sed '/^$/d' | sort -u | paste -sd, -)"
  echo "setup: installing plexus${all:+[$all]} into $PLEXUS_VENV" >&2
  # setuptools' own notes (an editable install's) are not the user's business; errors still show
  PYTHONWARNINGS=ignore "$py" -m pip install -q -e "$PLEXUS_REPO${all:+[$all]}"
  echo "$want_hash $all" > "$stamp_file"
fi

export PATH="$PLEXUS_VENV/bin:$PATH"
export OPAL_PREFIX="${OPAL_PREFIX:-$PLEXUS_VENV}"   # the pip Open MPI finds its help files
if ((EUID == 0)); then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
