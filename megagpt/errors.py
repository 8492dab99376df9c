"""One error type for every user mistake megagpt can name (bad file, line, key or value).

Entry points catch ``MegaGPTError`` and print its message on one line (exit code 2) instead of a
traceback; anything else escaping is a bug in megagpt, not in the user's input.
"""
import functools
import sys


class MegaGPTError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


def cli_main(fn):
    """Decorate a CLI ``main`` so a ``MegaGPTError`` becomes ``error: <msg>`` on stderr, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MegaGPTError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
