"""training/signals.py: a rank stops on SIGTERM at a step boundary, and never inherits an ignored SIGTERM."""
import os
import signal
import subprocess
import sys

from sg_distributed.training.signals import GracefulStop, rearm_sigterm


def test_graceful_stop_records_the_signal_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == signal.SIGTERM and stop.exit_code == 143 and stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


def test_rearm_sigterm_undoes_an_inherited_ignore():
    """The Slurm scripts start their launchers with SIGTERM ignored (launch/slurm/lib.sh); exec keeps that, so a
    rank that did not re-arm would ignore a SIGTERM before training starts and never be stopped by it."""
    code = ("import os, signal, sys; from sg_distributed.training.signals import rearm_sigterm; "
            "assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN; rearm_sigterm(); "
            "os.kill(os.getpid(), signal.SIGTERM); sys.exit(0)")
    proc = subprocess.run(["bash", "-c", 'trap "" TERM; exec "$@"', "_", sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -signal.SIGTERM  # died of the signal instead of running on to exit(0)
    rearm_sigterm()  # no-op where SIGTERM is not ignored
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
