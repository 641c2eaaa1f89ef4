"""One-line summaries of exceptions, for logs and for the failure reasons the engine reports
(``rerank_cli.errors.one_line`` is another thing: a whole message with its whitespace collapsed)."""

from __future__ import annotations

# Long enough for any message worth reading; compiler and dispatcher errors can run to pages.
MAX_CHARS = 300


def error_summary(error: BaseException, max_chars: int = MAX_CHARS) -> str:
    """``"TypeName: first line of the message"``, cut to ``max_chars`` characters of message.

    The first line only: inductor's errors carry the generated code after it, and the
    dispatcher's list every backend.
    """
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:max_chars]}"
