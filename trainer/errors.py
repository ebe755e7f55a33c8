"""The trainer's error type."""

from __future__ import annotations

from transform.errors import UsageError


class TrainError(UsageError):
    """Training cannot start or go on; the message names what is wrong and what to do."""
