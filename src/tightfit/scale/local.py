"""Local worker processes for ``tightfit run --workers N``: ``tightfit worker`` subprocesses that die
with the process that started them (so a restarted run may recover their trials at once)."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from pathlib import Path


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the parent dies
    except OSError:
        pass  # not Linux: the workers outlive a killed parent and finish the budget alone


class LocalWorkers:
    """``count`` ``tightfit worker`` processes on ``storage_url``/``study_name``, logs in ``log_dir``."""

    def __init__(
        self,
        config: Path,
        count: int,
        storage_url: str,
        study_name: str,
        log_dir: Path,
        heartbeat_interval: int,
        grace_period: int,
    ) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        for index in range(count):
            log_path = log_dir / f"worker-{index + 1}.log"
            command = [
                sys.executable,
                "-m",
                "tightfit.cli.app",
                "worker",
                str(config),
                "--storage",
                storage_url,
                "--study",
                study_name,
                "--heartbeat-interval",
                str(heartbeat_interval),
                "--grace-period",
                str(grace_period),
            ]
            with open(log_path, "ab") as log:
                self.processes.append(
                    subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
                )
            self.logs.append(log_path)

    def stop(self, timeout_s: float = 30.0) -> list[int | None]:
        """Wait for the workers (they exit once the budget is used), then end any left; exit codes."""
        codes = []
        for process in self.processes:
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.terminate()  # SIGTERM: the worker re-queues its trial and exits
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            codes.append(process.returncode)
        return codes
