"""The release gate's one client of a model server: version status with a deadline, and Predict.

Every step of the gate that talks to a server goes through :class:`ModelServerClient`: the dry
run (is the model READY, what does it answer), deploy and rollback (is the new version the one
served), and the server process the gate starts (has it loaded anything yet). It speaks only
TF Serving's gRPC API, so it works the same against the built-in server and a real
``tensorflow_model_server``. States follow TFX InfraValidator: NOT_READY while loading, READY
once a version is AVAILABLE, UNAVAILABLE when loading failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import grpc
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from transform.errors import WidedeepError

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END
STATUS_TIMEOUT_S = 5.0
"""Deadline of one GetModelStatus call."""
POLL_SECONDS = 0.2


class ServerState(StrEnum):
    """What a model server is doing with a model, as InfraValidator names it."""

    NOT_READY = "NOT_READY"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


class ModelServerError(WidedeepError, RuntimeError):
    """The server did not serve what was expected within the deadline, or could not load it."""


class ModelServerClient:
    """TF Serving's ModelService and PredictionService for one model at ``target``.

    One channel for the client's life (a context manager closes it). Calls that find no server
    answering are treated as NOT_READY, never as an error, so a server that is still starting
    is simply waited for.
    """

    def __init__(self, target: str, model_name: str) -> None:
        self.target = target
        self.model_name = model_name
        self._channel = grpc.insecure_channel(target)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._predictions = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def __enter__(self) -> ModelServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    # ------------------------------------------------------------------ status

    def version_states(self, timeout_s: float = STATUS_TIMEOUT_S) -> dict[int, int] | None:
        """Each version's ``ModelVersionStatus.State``; None while the server does not answer."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        try:
            response = self._models.GetModelStatus(request, timeout=timeout_s)
        except grpc.RpcError:
            return None
        return {s.version: s.state for s in response.model_version_status}

    def state(self) -> ServerState:
        """READY once any version is AVAILABLE, UNAVAILABLE when every version failed."""
        states = self.version_states()
        if not states:
            return ServerState.NOT_READY
        if AVAILABLE in states.values():
            return ServerState.READY
        if all(s == END for s in states.values()):
            return ServerState.UNAVAILABLE
        return ServerState.NOT_READY

    def serving_version(self) -> int | None:
        """The highest AVAILABLE version, or None."""
        available = [v for v, s in (self.version_states() or {}).items() if s == AVAILABLE]
        return max(available) if available else None

    def wait_for_version(
        self,
        version: int | None,
        timeout_s: float,
        *,
        newest: bool = False,
        end_is_failure: bool = False,
        alive: Callable[[], bool] | None = None,
        poll_s: float = POLL_SECONDS,
    ) -> float:
        """Waits until ``version`` (None: any version) is AVAILABLE; returns the seconds waited.

        With ``newest``, the version must also be the highest AVAILABLE one (a deploy or a
        rollback is done only when the server serves that version, not merely has it).
        ``end_is_failure``: a version in state END failed to load (true of a server that was
        just started; on a running server, END is also a version unloaded earlier, which a
        rollback loads again). ``alive`` says whether the server is still running (a process
        the caller started).

        Raises:
          ModelServerError: the server stopped, the version (or, for any version, every
            version) failed to load, or the deadline passed; the message gives the last
            states seen.
        """
        started = time.monotonic()
        deadline = started + timeout_s
        last: object = "no answer"
        wanted = f"version {version}" if version is not None else "a version"
        while True:
            if alive is not None and not alive():
                raise ModelServerError(f"the model server stopped before serving {wanted}")
            states = self.version_states()
            if states is not None:
                last = _state_names(states)
                available = [v for v, s in states.items() if s == AVAILABLE]
                if version is None and available:
                    return time.monotonic() - started
                served = version is not None and version in available
                if served and (not newest or max(available) == version):
                    return time.monotonic() - started
                if end_is_failure and version is not None and states.get(version) == END:
                    raise ModelServerError(
                        f"version {version} of {self.model_name!r} failed to load"
                    )
                if version is None and states and all(s == END for s in states.values()):
                    raise ModelServerError(f"the model server could not load {self.model_name!r}")
            if time.monotonic() >= deadline:
                raise ModelServerError(
                    f"{wanted} of {self.model_name!r} was not "
                    f"{'the newest ' if newest else ''}AVAILABLE at {self.target} within "
                    f"{timeout_s:.0f} s (last seen: {last})"
                )
            time.sleep(poll_s)

    # ------------------------------------------------------------------ Predict

    def predict(self, request: Any, timeout_s: float = 30.0) -> Any:
        """Sends a ``PredictRequest`` for this model (its name is set here); the response."""
        request.model_spec.name = self.model_name
        return self._predictions.Predict(request, timeout=timeout_s)


def _state_names(states: dict[int, int]) -> dict[int, str]:
    return {v: get_model_status_pb2.ModelVersionStatus.State.Name(s) for v, s in states.items()}
