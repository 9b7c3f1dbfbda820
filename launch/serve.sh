#!/usr/bin/env bash
# Launch `plexus serve` across MPI ranks with Open MPI 5's mpirun.
#
#   launch/serve.sh [-n N] [--hostfile FILE] [--dry-run] -- <plexus serve args>
#
#   -n N             ranks (default: total slots in FILE, else 2)
#   --hostfile FILE  Open MPI hostfile (see hostfiles/); default: this host only
#   --dry-run        print the mpirun command instead of running it
#
# Environment:
#   PLEXUS_VENV         venv with mpirun + plexus (default: <repo>/.venv)
#   PLEXUS_MPIRUN_ARGS  extra mpirun arguments (word-split), e.g. "--mca btl_tcp_if_include eth0"
#   PLEXUS_*            forwarded to every rank, as are PATH, LD_LIBRARY_PATH,
#                       PYTHONPATH, OMP_NUM_THREADS and HF_* when set; e.g.
#                       PLEXUS_CONFIG=plexus.yaml (options file, same path on every box)
#   PLEXUS_PROGRESS     1/0: force the load progress bar on/off (default: on when
#                       this script's stderr is a terminal)
#
# Stopping: SIGTERM or SIGINT (Ctrl-C) to this script drains the server: it passes them on to
# mpirun as SIGUSR1, which mpirun forwards to every rank; rank 0 stops accepting, finishes
# in-flight requests (up to --drain-timeout), tells the other ranks to stop, and every rank and
# this script exit 0. A second signal stops at once. (SIGTERM to mpirun itself cannot drain:
# Open MPI kills the ranks within half a second.) mpirun runs in a process group of its own, so
# a terminal's Ctrl-C reaches this script only.
#
# This file is also sourced by launch/batch.sh for plexus_mpirun().
set -euo pipefail

PLEXUS_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# plexus_mpirun SUBCOMMAND "$@": parses [-n N] [--hostfile FILE] [--dry-run] [--]
# then runs `mpirun ... plexus SUBCOMMAND <rest>`.
plexus_mpirun() {
  local sub="$1"; shift
  local np="" hostfile="" dry=0
  while (($#)); do
    case "$1" in
      -n|--np) np="$2"; shift 2 ;;
      --hostfile) hostfile="$2"; shift 2 ;;
      --dry-run) dry=1; shift ;;
      -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; return 0 ;;
      --) shift; break ;;
      *) echo "$(basename "$0"): unexpected '$1' (plexus args go after --)" >&2; return 2 ;;
    esac
  done

  local venv="${PLEXUS_VENV:-$PLEXUS_REPO/.venv}"
  local mpirun="$venv/bin/mpirun"
  [[ -x "$mpirun" ]] || { echo "no mpirun at $mpirun (set PLEXUS_VENV)" >&2; return 1; }
  # The console script if installed, else the package from this checkout.
  local -a plexus=("$venv/bin/plexus")
  if [[ ! -x "${plexus[0]}" ]]; then
    plexus=("$venv/bin/python" -m plexus)
    export PYTHONPATH="$PLEXUS_REPO${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PATH="$venv/bin:$PATH"

  # Hosts and slots from the hostfile ("host slots=K", '#' comments; no slots= means 1).
  local nhosts=1 slots total=0
  slots="$(nproc)"
  if [[ -n "$hostfile" ]]; then
    [[ -r "$hostfile" ]] || { echo "cannot read hostfile $hostfile" >&2; return 1; }
    read -r nhosts total < <(awk '{sub(/#.*/, "")} NF {n++; s = 1
        for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { split($i, a, "="); s = a[2] }
        t += s} END {print n + 0, t + 0}' "$hostfile")
    slots="$total"
  fi
  np="${np:-${hostfile:+$total}}"; np="${np:-2}"

  local -a cmd=("$mpirun" -n "$np" --bind-to none)
  [[ -n "$hostfile" ]] && cmd+=(--hostfile "$hostfile")
  # ULFM: a collective on rank 0 fails fast when a rank dies, so the endpoint answers 503
  [[ "$sub" == serve ]] && cmd+=(--with-ft ulfm)
  ((nhosts == 1 && np > slots)) && cmd+=(--oversubscribe)
  ((EUID == 0)) && cmd+=(--allow-run-as-root)
  # A rank's stderr is a pipe under mpirun: tell rank 0 whether ours is a terminal (load bar).
  [[ -t 2 && -z "${PLEXUS_PROGRESS+x}" ]] && export PLEXUS_PROGRESS=1
  local v
  for v in PATH LD_LIBRARY_PATH PYTHONPATH OMP_NUM_THREADS $(compgen -e | grep -E '^(PLEXUS|HF)_' || true); do
    [[ -n "${!v+x}" ]] && cmd+=(-x "$v")   # forward only what is set (else mpirun warns)
  done
  # shellcheck disable=SC2206
  cmd+=(${PLEXUS_MPIRUN_ARGS:-} "${plexus[@]}" "$sub" "$@")

  if ((dry)); then printf '%q ' "${cmd[@]}"; echo; return 0; fi
  [[ "$sub" == serve ]] || exec "${cmd[@]}"

  # serve: keep mpirun out of the terminal's process group and turn our SIGTERM/SIGINT into a
  # SIGUSR1 for it (forwarded to every rank: rank 0 drains, the others wait for rank 0)
  set -m
  (exec "${cmd[@]}" < /dev/null) &   # $! is mpirun itself
  local pid=$! rc
  set +m
  trap 'kill -USR1 "$pid" 2> /dev/null' TERM INT HUP
  while :; do
    rc=0
    wait "$pid" || rc=$?
    ((rc > 128)) && kill -0 "$pid" 2> /dev/null && continue   # a trapped signal ended the wait
    break
  done
  trap - TERM INT HUP
  return "$rc"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  plexus_mpirun serve "$@"
fi
