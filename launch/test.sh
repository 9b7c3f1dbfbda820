#!/usr/bin/env bash
# Fresh machine to a full test run: set up the venv with the test extras, then run
#   1. the pytest-mpi suites under mpirun at world sizes 2, 3 and 4,
#   2. the main suite (single process; its tests start their own mpirun jobs and,
#      as root or in CI, a real single-node Slurm).
# Extra arguments go to the main pytest run, e.g. `launch/test.sh -k parity -x`.
set -uo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh test
set +e

status=0
mpi_tests=(tests/test_comm_mpi.py)
errs=$(mktemp)
trap 'rm -f "$errs"' EXIT
for n in 2 3 4; do
  for try in 1 2; do
    echo "== pytest-mpi, world size $n" >&2
    mpirun -n "$n" --oversubscribe python -m pytest --with-mpi -q -p no:cacheprovider \
      --timeout 300 "${mpi_tests[@]}" 2> >(tee "$errs" >&2)
    rc=$?
    wait  # for tee
    # Open MPI's launcher now and then fails before starting any rank: launch it once more
    if [ $rc -ne 0 ] && [ $try = 1 ] && grep -q "PMIx server's listener thread failed to start" "$errs"; then
      echo "== mpirun failed to start; again" >&2
      continue
    fi
    [ $rc -eq 0 ] || status=1
    break
  done
done

echo "== main suite" >&2
python -m pytest -q --timeout 600 -p no:cacheprovider tests "$@" || status=1
exit $status
