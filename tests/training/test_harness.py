"""The test harness's multi-rank launcher retries once on the known teardown abort, and on nothing else."""
import sys

from conftest import TEARDOWN_ABORT, run_ranks

# Fails with the teardown message the first time (leaving a marker), succeeds the second time.
FLAKY = f"""
import pathlib, sys
marker = pathlib.Path(sys.argv[1])
if not marker.exists():
    marker.write_text("1")
    sys.stderr.write({TEARDOWN_ABORT!r})
    sys.exit(134)
print("second launch")
"""


def test_a_teardown_abort_is_launched_once_more(tmp_path, recwarn):
    proc = run_ranks([sys.executable, "-c", FLAKY, str(tmp_path / "marker")])
    assert proc.returncode == 0 and "second launch" in proc.stdout
    assert any("aborted at teardown" in str(w.message) for w in recwarn)


def test_any_other_failure_is_not_retried(tmp_path):
    marker = tmp_path / "count"
    code = f"import pathlib,sys; p=pathlib.Path({str(marker)!r}); p.write_text(p.read_text()+'x' if p.exists() else 'x'); sys.exit(1)"
    proc = run_ranks([sys.executable, "-c", code])
    assert proc.returncode == 1 and marker.read_text() == "x"
