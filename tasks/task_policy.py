"""How the Prefect tasks are cached and retried: cache keys, the retry policy and the file-task decorator.

A file task's cache key is the same key its output's manifest records, so a run finds an identical
earlier one both in Prefect's cache and on disk.
"""

import errno
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.context import TaskRunContext
from prefect.states import State
from prefect.tasks import Task, exponential_backoff

from featuresum.tasks import s3, storage
from featuresum.tasks.errors import InputError


@dataclass(frozen=True)
class RetrySettings:
    """How tasks that touch files retry transient failures: count, backoff, jitter."""

    retries: int = 3
    backoff_seconds: float = 1.0
    jitter_factor: float = 0.5


FILE_RETRIES = RetrySettings()
# Failures that can heal by themselves: a flaky disk or network filesystem, a busy or reset peer.
# A missing file, a permission, a read-only or full disk does not heal by waiting, so it fails at once.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.EAGAIN,
        errno.EINTR,
        errno.EBUSY,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.EPIPE,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ESTALE,
    }
)
# Parameters that do not shape a task's output (the shards of write_predictions are a function of its spec).
# `refresh` asks for a recomputation and `memory_mb` says whether rows are streamed; neither changes the output.
UNKEYED = frozenset({"shards", "refresh", "memory_mb"})


def is_transient_error(error: BaseException | None) -> bool:
    """Whether retrying can fix this failure: EIO, EAGAIN, timeouts, connection resets and the like."""
    if isinstance(error, InputError):
        return False
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
        return True
    return s3.is_transient(error)


def is_transient(task: Task, task_run: Any, state: State) -> bool:
    """Retry condition of the file tasks: only failures that can heal are retried."""
    return is_transient_error(state.data if isinstance(state.data, BaseException) else None)


def task_key(name: str, parameters: dict[str, Any]) -> str:
    """Cache key of a run of task `name`: every parameter that shapes its output, and the code version."""
    return storage.spec_key({"task": name, **{k: v for k, v in parameters.items() if k not in UNKEYED}})


def cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Prefect's cache key of a file task: the same key its output's manifest records."""
    return task_key(context.task.name, parameters)


def own_key() -> str:
    """The cache key of the task run in progress: the key its output's manifest is to record."""
    context = TaskRunContext.get()
    return cache_key(context, context.parameters)


def identity_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key of a user's file: its path and identity, so an unchanged file is never hashed twice."""
    path = storage.at(parameters["path"])
    try:
        current = storage.identity(path)
    except OSError:
        current = {"missing": True}
    return storage.spec_key({"task": context.task.name, **parameters, "path": str(path), **current})


def file_task(**options: Any):
    """Decorator for a heavy task: cached across runs as JSON, retried on transient file errors; `options` override."""
    defaults = {
        "cache_key_fn": cache_key,
        "persist_result": True,
        "result_serializer": "json",
        "retries": FILE_RETRIES.retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=FILE_RETRIES.backoff_seconds),
        "retry_jitter_factor": FILE_RETRIES.jitter_factor,
        "retry_condition_fn": is_transient,
    }
    return task(**{**defaults, **options})
