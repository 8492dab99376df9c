"""One error type for every user mistake megagpt can name (bad file, line, key or value): entry
points print it on one line (exit 2) instead of a traceback. Where the mistake is travels as plain
attributes (they survive pickling): ``key`` (``'train.lr'``, or a section's own field name),
``file`` and ``line``, or ``flag``; the message is built from them:
``file, line N, key 'a.b': why`` or ``--seq-length 99, key 'data.seq_length': why``.
"""
import functools
import os
import sys
import warnings


class MegaGPTError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""

    def __init__(self, reason: str, *, key: str | None = None, file: str | None = None, line: int | None = None,
                 flag: str | None = None):
        self.reason, self.key, self.file, self.line, self.flag = str(reason), key, file, line, flag
        super().__init__(self._message())

    def _message(self) -> str:
        where = self.flag or (f"{self.file}, line {self.line}" if self.file and self.line else self.file)
        if not where:   # on its own the reason already names the field
            return self.reason
        return f"{where}, key '{self.key}': {self.reason}" if self.key else f"{where}: {self.reason}"

    def located(self, *, key: str | None = None, file: str | None = None, line: int | None = None,
                flag: str | None = None) -> "MegaGPTError":
        """A copy with the given location fields replaced (``None`` keeps the current one)."""
        return type(self)(self.reason, key=key or self.key, file=file or self.file, line=line or self.line,
                          flag=flag or self.flag)


def cli_main(fn):
    """A CLI ``main`` whose ``MegaGPTError`` is one ``error: <msg>`` line and exit 2; warnings ``warning: <msg>``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
        try:
            return fn(*args, **kwargs)
        except MegaGPTError as e:
            # every rank of a job finds the same mistake (same config and data): rank 0 (or a plain process) says it
            if os.environ.get("RANK", "0").strip() in ("", "0"):
                print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper


def first_line(e: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` — a deep library error, quoted inside one line of ours."""
    return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:limit]
