"""Errors meant for people: the one base class of the library's user errors.

A `WMError` says the request cannot be met as given: bad input or settings, a missing, foreign or
mismatched file. Its message names the file, the setting or the argument, what was found and what was
expected, in the library's words (a setting is `section.field`, an argument is the function's), so it
reads the same from a notebook and from the `wm` command. The command shows a `WMError` (or an
`OSError`) as one line; any other exception is a bug and keeps its traceback.

It subclasses ValueError, so `except ValueError` around library calls keeps working.
"""

from __future__ import annotations


class WMError(ValueError):
    """A user error: bad input or settings, a missing, foreign or mismatched file."""


class SetupError(WMError, RuntimeError):
    """The installation lacks something a request needs (an optional dependency)."""
