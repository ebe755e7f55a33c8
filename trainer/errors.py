"""The trainer's error type."""

from __future__ import annotations


class TrainError(ValueError):
    """Training cannot start or go on; the message names what is wrong and what to do."""
