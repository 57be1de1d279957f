"""Errors the engine raises, each carrying its stable code and whether a retry may help.

Owns the policy flags (`code`, `retryable`); callers decide from them, never from an
isinstance ladder. Input errors and infrastructure errors are different classes.
"""

from __future__ import annotations

from typing import ClassVar


class PipelineError(Exception):
    """Base of every engine error. `code` matches the contract's error codes."""

    code: ClassVar[str] = "internal"
    retryable: ClassVar[bool] = False


class InvalidRequest(PipelineError):
    """The generation parameters are not acceptable; the message names the field."""

    code = "invalid_request"


class ImageInvalid(PipelineError):
    """The input image is not a supported, decodable picture within the limits."""

    code = "image_invalid"


class ModelLoadError(PipelineError):
    """MODEL_CKPT_DIR is missing, incomplete or holds weights we refuse to load."""

    code = "internal"


class BackendUnavailable(PipelineError, ValueError):
    """ATTENTION_BACKEND names a kernel this node cannot run (a package or the device is
    missing); the message says what is missing and what the node has. Raised at engine
    start: it is the node's configuration, not a job's, and a restart will not help."""

    code = "internal"


class CompileFailed(PipelineError):
    """TORCH_COMPILE could not compile the transformer blocks as one graph each (a graph
    break or a recompile per block); raised at engine start rather than running eagerly."""

    code = "internal"


class OutOfMemory(PipelineError):
    """The device ran out of memory; fewer frames or a smaller size may fit."""

    code = "out_of_memory"
    retryable = True


class VideoEncodingError(PipelineError):
    """Frames could not be encoded to MP4."""

    code = "internal"


class FailedOnRank(PipelineError):
    """The job failed on another rank of this engine; every rank fails it at the same step
    with that rank's code, message and retry flag."""

    def __init__(self, rank: int, code: str, message: str, retryable: bool) -> None:
        super().__init__(f"rank {rank}: {message}" if rank else message)
        self.rank = rank
        self.code = code  # type: ignore[misc]
        self.retryable = retryable  # type: ignore[misc]
