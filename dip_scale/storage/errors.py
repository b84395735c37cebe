"""The two words the storage layer adds to Python's own errors (see dip_scale/storage/__init__.py)."""

from __future__ import annotations


class NotFound(FileNotFoundError):
    """No such file, object or bucket; the message names the URL."""


class StoreUnavailable(RuntimeError):
    """The store could not be reached after all retries (refused, reset, timed out, throttled, 5xx)."""
