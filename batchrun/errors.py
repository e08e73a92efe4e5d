"""Errors a job can end with, each carrying its process exit code (sysexits.h style).

Every failure a user can cause or fix is one of these; anything else is a bug and exits 1 with a traceback
in the log.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # runtime failure: the model crashed, a bug, too many row errors
EXIT_USAGE = 2  # bad command line (click uses 2 as well)
EXIT_DATAERR = 65  # input data error: missing file or column, duplicate ids
EXIT_TEMPFAIL = 75  # temporary failure: output locked by another run, interrupted; retry later
EXIT_CONFIG = 78  # invalid job spec


class BatchrunError(Exception):
    """Base class: a message for the user and an exit code."""

    exit_code = EXIT_FAILURE
    kind = "error"

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.problems = problems or []

    def __str__(self) -> str:
        if not self.problems:
            return self.message
        return self.message + "\n" + "\n".join(f"  - {p}" for p in self.problems)


class SpecError(BatchrunError):
    """The job spec is invalid; ``problems`` lists every one as 'field.path: what is wrong'."""

    exit_code = EXIT_CONFIG
    kind = "invalid_spec"


class InputDataError(BatchrunError):
    """The input table cannot be used: a missing file or column, duplicate or null ids."""

    exit_code = EXIT_DATAERR
    kind = "input_error"


class TemporaryFailure(BatchrunError):
    """Retrying later may succeed: the output is locked by another run, or the job was interrupted."""

    exit_code = EXIT_TEMPFAIL
    kind = "temporary_failure"


class RuntimeFailure(BatchrunError):
    """The job ran and failed: the model could not be loaded, the engine crashed."""

    exit_code = EXIT_FAILURE
    kind = "runtime_failure"


class UsageError(BatchrunError):
    """The command line is wrong (a malformed ``--set``, say)."""

    exit_code = EXIT_USAGE
    kind = "usage_error"
