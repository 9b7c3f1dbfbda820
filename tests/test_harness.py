"""The test harness's own behaviour (tests/helpers.py): what it forgives and what it does not."""

from __future__ import annotations

import sys

from tests.helpers import LAUNCHER_FLAKES, run


def _counting_cmd(tmp_path, fail_first: int, message: str) -> list[str]:
    """A command that counts its runs in a file and fails its first ``fail_first`` runs with ``message``."""
    counter = tmp_path / "runs"
    code = (f"import pathlib, sys; p = pathlib.Path({str(counter)!r}); n = int(p.read_text() or 0) if p.exists() else 0; "
            f"p.write_text(str(n + 1)); "
            f"sys.exit(0) if n >= {fail_first} else (sys.stderr.write({message!r}), sys.exit(1))")
    return [sys.executable, "-c", code]


def test_a_launch_that_failed_to_start_is_run_again(tmp_path):
    r = run(_counting_cmd(tmp_path, 1, LAUNCHER_FLAKES[0] + ". We cannot\ncontinue.\n"))
    assert r.rc == 0, r.describe()
    assert (tmp_path / "runs").read_text() == "2"


def test_it_gives_up_after_three_launches(tmp_path):
    r = run(_counting_cmd(tmp_path, 5, LAUNCHER_FLAKES[0]))
    assert r.rc == 1 and LAUNCHER_FLAKES[0] in r.stderr
    assert (tmp_path / "runs").read_text() == "3"


def test_any_other_failure_is_not_run_again(tmp_path):
    r = run(_counting_cmd(tmp_path, 1, "plexus: error: something the test should see\n"))
    assert r.rc == 1 and "plexus: error" in r.stderr
    assert (tmp_path / "runs").read_text() == "1"
