"""How the command-line tools report errors: a mistake in the input (config, dataset files,
checkpoint) prints one message and exits with status 1; the traceback is for bugs, or on request
(``--debug`` or FASTMASKFORMER_DEBUG=1)."""
from __future__ import annotations

import contextlib
import os
import sys

from ..config import UserError

DEBUG_ENV = "FASTMASKFORMER_DEBUG"
# Errors about the user's input. The OS errors are the path ones (a weights file that is not there,
# an output folder without write permission), which code outside fastmaskformer raises too.
USER_ERRORS = (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def debug_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


@contextlib.contextmanager
def user_errors(prog: str, debug: bool = False):
    """Inside the block, a user error exits with ``<prog>: error: <message>`` on stderr, status 1,
    unless ``debug`` (or FASTMASKFORMER_DEBUG) asks for the traceback."""
    try:
        yield
    except USER_ERRORS as e:
        if debug_requested(debug):
            raise
        message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        print(f"{prog}: error: {message}\n(--debug or {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)
