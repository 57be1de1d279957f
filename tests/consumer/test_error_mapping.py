"""Every pipeline error crosses the engine boundary mapped, in-process and without ranks:
PipelineError -> JobFailed (as a rank builds it) -> JobError (as the host maps it) -> ErrorCode.

Like httpx's test that every httpcore exception is mapped: a new PipelineError subclass that
lands on INTERNAL, or loses its code or retry flag on the way, fails here until it is mapped
(failures.ENGINE_ERRORS) or listed in INTERNAL_ON_PURPOSE with the reason.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import i2v_fleet.pipeline
from i2v_fleet.consumer.engine.child import job_failed
from i2v_fleet.consumer.engine.failures import job_error
from i2v_fleet.consumer.engine.wire import JobFailed
from i2v_fleet.consumer.errors import InternalError, JobError
from i2v_fleet.pipeline.errors import (
    BackendUnavailable,
    CompileFailed,
    FailedOnRank,
    ModelLoadError,
    PipelineError,
    VideoEncodingError,
)
from i2v_fleet.pipeline.layout import LayoutError
from i2v_fleet.schemas import ErrorCode


def _every_pipeline_error() -> list[type[PipelineError]]:
    """Every subclass of PipelineError, wherever in the pipeline package it is defined."""
    # A subclass exists for __subclasses__ only once its module is imported: import them all.
    for module in pkgutil.walk_packages(i2v_fleet.pipeline.__path__, "i2v_fleet.pipeline."):
        importlib.import_module(module.name)
    found: set[type[PipelineError]] = set()
    todo = list(PipelineError.__subclasses__())
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return sorted(found, key=lambda cls: f"{cls.__module__}.{cls.__qualname__}")


PIPELINE_ERRORS = _every_pipeline_error()

INTERNAL_ON_PURPOSE: dict[type[PipelineError], str] = {
    ModelLoadError: "the node's checkpoint is at fault, not the job",
    BackendUnavailable: "the node's ATTENTION_BACKEND is at fault, not the job",
    CompileFailed: "the node's TORCH_COMPILE is at fault, not the job",
    LayoutError: "the node's layout settings are at fault, not the job",
    VideoEncodingError: "the engine made the frames: failing to encode them is ours",
}
"""Pipeline errors that are meant to reach the submitter as `internal`, and why."""


def _examples(cls: type[PipelineError]) -> list[PipelineError]:
    """Instances of `cls` as the engine raises them."""
    if cls is FailedOnRank:  # carries another rank's code and flag: every code it may carry
        return [
            FailedOnRank(1, "out_of_memory", "out of device memory at 1280x720", True),
            FailedOnRank(1, "invalid_request", "num_frames must be 4n+1", False),
            FailedOnRank(1, "image_invalid", "not a picture", False),
            FailedOnRank(1, "internal", "engine error: RuntimeError: boom", True),
        ]
    return [cls(f"a {cls.__name__} for the test")]


def _across(exc: BaseException) -> JobError:
    """`exc` carried the whole way: the rank's report, then the host's node error."""
    failed = job_failed("job-1", exc)
    assert isinstance(failed, JobFailed)
    return job_error(failed)


@pytest.mark.parametrize("cls", PIPELINE_ERRORS, ids=lambda cls: cls.__name__)
def test_every_pipeline_error_keeps_its_code_and_retry_flag_across_the_engine(
    cls: type[PipelineError],
) -> None:
    """Each PipelineError reaches the event as its own ErrorCode and retry flag, never as
    `internal` unless INTERNAL_ON_PURPOSE says why."""
    for exc in _examples(cls):
        info = _across(exc).info()
        assert info.code == ErrorCode(exc.code), f"{cls.__name__} lost its code {exc.code!r}"
        assert info.retryable is exc.retryable, f"{cls.__name__} lost its retry flag"
        assert str(exc) in info.message
        # FailedOnRank only carries another rank's code; its examples cover each one.
        if info.code == ErrorCode.INTERNAL and cls is not FailedOnRank:
            assert cls in INTERNAL_ON_PURPOSE, (
                f"{cls.__name__} reaches submitters as `internal`: give it its own code "
                "(mapped in consumer/engine/failures.py) or add it to INTERNAL_ON_PURPOSE"
            )


def test_the_internal_on_purpose_list_names_only_live_internal_errors() -> None:
    """A class listed as internal on purpose still exists and still maps to `internal`."""
    for cls in INTERNAL_ON_PURPOSE:
        assert cls in PIPELINE_ERRORS
        assert _across(_examples(cls)[0]).info().code == ErrorCode.INTERNAL


def test_an_engine_bug_is_internal_and_retryable_and_names_only_its_type() -> None:
    """An exception that is not a PipelineError fails the job as a retryable `internal`."""
    error = _across(RuntimeError("the prompt was: a secret"))
    assert isinstance(error, InternalError)
    assert (error.code, error.retryable) == (ErrorCode.INTERNAL, True)
    assert str(error) == "engine error: RuntimeError"


def test_a_code_nobody_mapped_still_fails_the_job_with_its_flag() -> None:
    """An unknown wire code becomes `internal` with the code in the message, flag kept."""
    error = job_error(JobFailed("job-1", "disk_full", "no space left", True))
    assert isinstance(error, InternalError)
    assert error.retryable is True
    assert str(error) == "disk_full: no space left"
