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
for n in 2 3 4; do
  echo "== pytest-mpi, world size $n" >&2
  mpirun -n "$n" --oversubscribe python -m pytest --with-mpi -q -p no:cacheprovider \
    --timeout 300 "${mpi_tests[@]}" || status=1
done

echo "== main suite" >&2
python -m pytest -q --timeout 600 -p no:cacheprovider tests "$@" || status=1
exit $status
