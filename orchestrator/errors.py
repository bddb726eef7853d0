"""Errors that the command line turns into one clear line and an exit code."""


class BadInput(Exception):
    """Input that cannot run (a job file, a URI, credentials, user code): exit 2 before anything starts."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.lines = [message]


class RunFailed(Exception):
    """A run that started and then failed: exit 1 with the reason."""

    exit_code = 1


class StopRequested(BaseException):
    """Whoever runs the loop asked it to end at this step (a sweep's scheduler stopped the trial): not an error.

    A BaseException, as SystemExit is: no `except Exception` on the way out takes it for a failure.
    """


class DataError(ValueError):
    """Data that cannot train, found as it is read (a missing or non-finite value, a page that does not decode),
    naming the file, row group and column: the same data would fail a restart the same way, so it is never retried."""
