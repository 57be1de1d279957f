"""scripts/test runs mypy beside pytest (each is about a minute of one core): this plugin
waits for it at the end and reports its result before pytest's summary line, failing the
run when mypy failed. Without I2V_MYPY_STATUS (plain `pytest`) it does nothing."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest


def _mypy() -> tuple[int, str] | None:
    """mypy's exit status and output, once it has finished (None when not run beside)."""
    status = os.environ.get("I2V_MYPY_STATUS")
    if not status:
        return None
    path = Path(status)
    deadline = time.monotonic() + 600
    while not path.exists() or not path.read_text().strip():
        if time.monotonic() > deadline:
            return 1, f"mypy gave no result in 600 s ({path})"
        time.sleep(0.5)
    log = (
        Path(os.environ.get("I2V_MYPY_LOG", "")).read_text() if "I2V_MYPY_LOG" in os.environ else ""
    )
    return int(path.read_text().strip()), log


@pytest.hookimpl(hookwrapper=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Any:
    result = _mypy()
    if result is not None:
        session.config.stash[_RESULT] = result
        if result[0] != 0 and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    yield


def pytest_terminal_summary(terminalreporter: Any) -> None:
    result = terminalreporter.config.stash.get(_RESULT, None)
    if result is not None:
        code, log = result
        terminalreporter.section("mypy (run beside pytest)", red=code != 0, green=code == 0)
        terminalreporter.write(log if log.endswith("\n") else log + "\n")


_RESULT = pytest.StashKey[tuple[int, str]]()
