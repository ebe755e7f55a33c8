"""The errors the project raises on purpose, as opposed to a bug.

Every error that means "the input, the config, the data or the state on disk is not what this
step needs" is a :class:`WidedeepError`: the command line prints it as one line naming what is
wrong and exits with status 2. Anything else is a bug and keeps its traceback. Each package's
own error types derive from it (and from the built-in type callers already catch, such as
``ValueError``), so a new one is a user error by construction, not by being listed somewhere.
"""

from __future__ import annotations


class WidedeepError(Exception):
    """An error raised on purpose: the message says what is wrong and what to do."""


class UsageError(WidedeepError, ValueError):
    """An argument, setting or value given by the user is wrong; the message names it."""


class ArtifactError(WidedeepError, FileNotFoundError):
    """A folder is not the artifact a stage expects (no datagen output, no SavedModel, ...)."""


class OutputExistsError(WidedeepError, FileExistsError):
    """The output folder already holds results and overwriting was not asked for."""
