"""The errors that mean "the input was wrong", as opposed to a bug.

The CLI prints these as one line naming what is wrong and exits with status 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

from pipeline.datagen import OutputExistsError
from pipeline.sources import InputError
from serving.client import ScoringError
from serving.deploy import DeployError
from serving.process import ServerProcessError
from serving.validate import ValidationError
from trainer.errors import TrainError
from transform.config import ConfigError
from transform.paths import InUseError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    InputError,
    OutputExistsError,
    DeployError,
    TrainError,
    ValidationError,
    ScoringError,
    ServerProcessError,
    InUseError,
    FileExistsError,
    FileNotFoundError,
    ValueError,
)
