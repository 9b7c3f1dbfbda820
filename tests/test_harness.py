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


def test_the_suite_sets_up_without_the_shared_models(tmp_path):
    """A clone without ../shared beside it: every fixture of the test files that use the shared
    models sets up (or skips with a reason) instead of erroring. ``--setup-only`` runs the
    fixtures and not the tests; PLEXUS_TEST_SHARED points at an empty directory."""
    from tests.helpers import REPO_ROOT, TESTS_DIR

    users = sorted(str(p) for p in TESTS_DIR.glob("test_*.py")
                   if p.name != "test_harness.py" and any(w in p.read_text() for w in ("STORIES", "stories_dir")))
    assert len(users) >= 4, users
    r = run([sys.executable, "-m", "pytest", "--setup-only", "-q", "-p", "no:cacheprovider", "-rs", *users],
            timeout=120, cwd=REPO_ROOT, env={"PLEXUS_TEST_SHARED": str(tmp_path)})
    assert r.rc == 0 and " error" not in r.stdout, r.describe()
    skips = [line for line in r.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all(str(tmp_path) in line for line in skips), r.describe()  # each says where it looked


def test_only_helpers_knows_where_the_shared_models_are():
    """Tests find ../shared through tests/helpers.py (SHARED_DIR, STORIES_DIR), so that one
    setting moves it and one skip reason names it."""
    from tests.helpers import TESTS_DIR

    quoted = ('"shared"', "'shared'")
    for p in sorted(TESTS_DIR.rglob("*.py")):
        if p.name not in ("helpers.py", "test_harness.py"):
            assert not any(q in p.read_text() for q in quoted), f"{p} builds the shared path itself"
