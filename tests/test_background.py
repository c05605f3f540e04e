"""A function in a second process: its value, its errors with their types and tracebacks, and stopping it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fwsvd_deploy.background import Background, ChildTraceback
from fwsvd_deploy.errors import ConfigError, ExportError
from fwsvd_deploy.pipeline import check_jobs


def _pid_and_sum(a: int, b: int) -> tuple[int, int]:
    return os.getpid(), a + b


def _fail_export(message: str) -> None:
    raise ExportError(message)


class _Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:  # pickling calls __init__ with one argument: fails to rebuild
        super().__init__(f"{a} and {b}")


def _fail_unpicklable() -> None:
    raise _Unpicklable(1, 2)


def _die() -> None:
    os._exit(7)


def _write_then_wait(folder: str) -> None:
    marker = Path(folder) / "partial"
    marker.write_text("half-written")
    try:
        Path(folder, "started").write_text("")
        time.sleep(120)
    finally:
        marker.unlink()


def test_the_value_comes_back_from_another_process() -> None:
    with Background(_pid_and_sum, 2, 3) as child:
        pid, total = child.result()
    assert total == 5
    assert pid != os.getpid()


def test_an_error_keeps_its_type_and_message_and_carries_the_childs_traceback() -> None:
    with Background(_fail_export, "the graph lost a fused operator") as child, \
            pytest.raises(ExportError, match="lost a fused operator") as caught:
        child.result()
    cause = caught.value.__cause__
    assert isinstance(cause, ChildTraceback)
    assert "_fail_export" in str(cause)


def test_an_error_that_does_not_pickle_still_reports_its_text() -> None:
    with Background(_fail_unpicklable) as child, pytest.raises(RuntimeError, match="_Unpicklable: 1 and 2"):
        child.result()


def test_a_child_that_dies_without_reporting_is_an_error_with_its_exit_code() -> None:
    with Background(_die) as child, pytest.raises(RuntimeError, match="exit code 7"):
        child.result()


def test_leaving_the_block_stops_the_child_and_lets_it_clean_up(tmp_path: Path) -> None:
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt), Background(_write_then_wait, str(tmp_path)):
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists():
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.05)
        raise KeyboardInterrupt  # as Ctrl-C in the parent
    assert time.monotonic() - began < 60
    assert not (tmp_path / "partial").exists(), "the stopped child did not run its clean-up"


@pytest.mark.parametrize("jobs", [0, 3, True, 1.5])
def test_jobs_other_than_one_or_two_are_refused(jobs: object) -> None:
    with pytest.raises(ConfigError, match="must be 1 .* or 2"):
        check_jobs(jobs)  # type: ignore[arg-type]


def test_jobs_default_to_what_the_machine_has() -> None:
    assert check_jobs(None) in (1, 2)
    assert check_jobs(1) == 1 and check_jobs(2) == 2
