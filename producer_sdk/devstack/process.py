"""A background process tracked by a pid file and logging to a file, for the local stack.

Owns starting, finding and stopping one detached service. Must never signal a pid it did
not start: a pid file is trusted only while that pid's command line still matches.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

# Services started by this very process: kept so that they are reaped (not left as
# zombies) and so that Popen does not warn about dropping a running child.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class BackgroundProcess:
    """One service of the stack: `<state_dir>/<name>.pid` and `<state_dir>/<name>.log`."""

    name: str
    state_dir: Path
    marker: str
    """A string that the service's command line contains, to recognise it after a restart."""

    @property
    def pid_file(self) -> Path:
        return self.state_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / f"{self.name}.log"

    def pid(self) -> int | None:
        """The running service's pid, or None (a stale pid file is removed)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if pid in _CHILDREN:  # started by this very process: no need to recognise it
            if _alive(pid):
                return pid
        elif _alive(pid):
            cmdline = _cmdline(pid)
            if cmdline is None or self.marker in cmdline:
                return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> int:
        """Start detached (own session, stdin closed), append output to the log, write the pid."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        _CHILDREN[proc.pid] = proc
        self.pid_file.write_text(f"{proc.pid}\n")
        return proc.pid

    def stop(self, timeout_s: float = 10.0) -> bool:
        """SIGTERM the service's process group, then SIGKILL after `timeout_s`. True if it ran."""
        pid = self.pid()
        if pid is None:
            return False
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not _alive(pid):
                    self.pid_file.unlink(missing_ok=True)
                    return True
                time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)
        return True

    def kill(self, timeout_s: float = 5.0) -> bool:
        """SIGKILL the service's process group at once, as a crash would; wait until it is gone.

        True if it ran. Nothing of the service gets to run after the signal: no flush, no
        goodbye to clients.
        """
        pid = self.pid()
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while _alive(pid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {self.name} (pid {pid}) outlived SIGKILL by {timeout_s} s")
            time.sleep(0.02)
        self.pid_file.unlink(missing_ok=True)
        return True

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def _alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str | None:
    """The process's command line, or None where there is no procfs (then trust the pid)."""
    if not Path("/proc/self/cmdline").exists():
        return None
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")
