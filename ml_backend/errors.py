"""Typed errors of the ML backend.

Each error has one meaning; ``app.py`` maps them to HTTP status codes in one table. Errors that
a worker expects (a bad prompt, an image that cannot be fetched) cross Redis as data
(``schemas.JobError``: the class name and message) and the queue client raises them again by
name through :func:`error_from_name`.
"""

from __future__ import annotations


class BackendError(Exception):
    """Base of every error the backend raises on purpose; its message is safe to show."""


class InvalidRequestError(BackendError):
    """The request from Label Studio is malformed or does not fit the label config."""


class RequestTooLargeError(InvalidRequestError):
    """The request body is larger than MAX_REQUEST_BYTES."""


class UnauthorizedError(BackendError):
    """Basic auth or API_TOKEN is on and the request's credentials are missing or wrong."""


class ImageFetchError(BackendError):
    """The task's image could not be downloaded (network, HTTP status, missing token)."""


class InvalidImageError(BackendError):
    """The downloaded bytes are not a decodable image, or the image is too large."""


class NoWorkerError(BackendError):
    """No live worker is listening, so a job would never run."""


class QueueFullError(BackendError):
    """The shared queue holds more jobs than QUEUE_MAX_DEPTH."""


class AnnotationFormatError(BackendError, ValueError):
    """A Label Studio annotation or export that cannot be read (several labels on a region, an
    RLE that does not match its size, a missing image)."""


class NoTrainerError(BackendError):
    """Training was requested but no trainer process is alive to take the job."""


class TrainingBusyError(BackendError):
    """Training was requested for a project while another project's job is queued or running
    (one job at a time)."""


class TrainingError(BackendError):
    """A training job cannot proceed (too few usable annotations, no serving version to start
    from, a base model the trainer cannot build)."""


class AnnotationStoreFullError(BackendError):
    """Recording an annotation would make the store outgrow ANNOTATION_STORE_MB."""


class JobTimeoutError(BackendError):
    """A job did not finish before the request's deadline."""


class JobFailedError(BackendError):
    """A job raised an unexpected error in the worker (details are in the worker's log)."""


class WorkerDiedError(JobFailedError):
    """The worker running a job stopped sending heartbeats (killed, crashed, out of memory)."""


class ModelError(JobFailedError):
    """The model could not be built or run (missing weights, device errors)."""


_BY_NAME: dict[str, type[BackendError]] = {
    cls.__name__: cls
    for cls in (
        InvalidRequestError,
        ImageFetchError,
        InvalidImageError,
        JobTimeoutError,
        JobFailedError,
        WorkerDiedError,
        ModelError,
    )
}


def error_from_name(name: str, message: str) -> BackendError:
    """Rebuild an error that crossed Redis as data.

    Args:
        name: the class name sent by the worker.
        message: its message.

    Returns:
        An instance of the named class; an unknown name gives a :class:`JobFailedError`.
    """
    return _BY_NAME.get(name, JobFailedError)(message)


# ---------------------------------------------------------------- outside a request


class RedisUnavailableError(NoWorkerError):
    """Redis cannot be reached, so no worker can be either."""


class SettingsError(ValueError):
    """An environment variable has a value the backend cannot use.

    Args:
        variable: the variable's name.
        message: what is wrong with its value.
    """

    def __init__(self, variable: str, message: str):
        super().__init__(f"{variable}: {message}")
        self.variable = variable


class VersionError(ValueError):
    """A version that does not exist, or cannot serve (no checkpoint file), or a promotion whose
    premise no longer holds (the version it was trained from stopped serving)."""


class StackError(RuntimeError):
    """The stack cannot start (port taken, another stack on the same data dir, bad setting)."""


class ChildExitedError(RuntimeError):
    """A child process ended while it was waited on; the message carries its log's tail."""
