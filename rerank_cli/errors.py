"""Exit codes and the one error the CLI raises itself."""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1  # the model cannot be loaded or downloaded, a file cannot be written, ...
EXIT_USAGE = 2  # bad options or inputs (argparse uses 2 too)


class UsageError(ValueError):
    """Bad command-line options or inputs: reported as ``rerank: error: ...``, exit code 2."""


def one_line(message: object) -> str:
    """``message`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(message).split())


class WorkFailed(RuntimeError):
    """The work failed for a reason other than the inputs: ``rerank: error: ...``, exit code 1."""
