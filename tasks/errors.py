"""Errors the CLI reports in one line; kept free of heavy imports so the CLI can catch them cheaply.

InputError is the user's to fix (exit code 2); EnvironmentFailure is the machine's or a
service's (exit code 1).
"""


class InputError(ValueError):
    """A problem with a user's file or option that retrying cannot fix; the message names it."""


class EnvironmentFailure(RuntimeError):
    """A problem outside the user's options and files: a server down, a disk full; the message says which."""


class DiskFull(EnvironmentFailure):
    """No space left where an output is being written; the message names the folder."""


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM, so a run can end in a final state."""

    def __init__(self, signal: int):
        super().__init__(f"terminated by signal {signal}")
        self.signal = signal
