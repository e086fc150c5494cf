"""The project's error types: what a command reports as one line (``cimlic: error: <file or key>: <problem>``).

Every error a user can cause (a bad file, a bad setting, a folder that cannot be used) is a :class:`CimlicError`;
the command line turns those into one line and exit status 2. Anything else is a bug and keeps its traceback.
The concrete classes live next to the code that raises them (``LabelFileError`` in ``data.labels``,
``CheckpointError`` in ``checkpoint``, ...) and also derive from ``ValueError`` (or ``OSError`` for image files),
so library callers may catch them as such.
"""

from __future__ import annotations


class CimlicError(Exception):
    """Base of every error caused by the user's input, files or settings (one-line message naming the culprit)."""


class ConfigError(CimlicError, ValueError):
    """A configuration file, override or setting is invalid (the message names the key or file and why)."""
