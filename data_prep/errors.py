"""The one exception type `dip-prep` reports as a plain message (no traceback) with a non-zero exit."""

from __future__ import annotations


class PrepError(Exception):
    """A problem with the command's input, output or arguments, stated so the user can fix it."""
