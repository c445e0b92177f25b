"""Which exceptions are a user's to fix (printed as one line by the CLI) rather than bugs (printed with a traceback)."""

from __future__ import annotations

import os

# Errors jaxcnn raises on purpose with a message that says what was wrong and how to fix it: a bad value, a missing
# or damaged dataset or checkpoint, a locked or unwritable workdir, a non-finite loss.
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError,
                                                     FloatingPointError, FileExistsError, IsADirectoryError)


def is_user_error(e: BaseException) -> bool:
    """True for errors whose message is the whole story; set JAXCNN_DEBUG=1 to always see the traceback."""
    if os.environ.get("JAXCNN_DEBUG"):
        return False
    return isinstance(e, USER_ERROR_TYPES) or getattr(e, "jaxcnn_user_error", False)
