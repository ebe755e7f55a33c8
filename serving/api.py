"""TF Serving's request handlers at the protobuf level, shared by the gRPC and REST front ends.

Each handler resolves the servable a `ModelSpec` names, runs it and counts the request in the
metrics (model, version, API, entrypoint, status, latency). Any error leaves as a `ServingError`
with TF Serving's code; an unexpected exception becomes INTERNAL and is logged, so no request can
take the server down. Before an inference request is run, the memory it will take is counted
and bounded (see `serving.limits`); config reloads are refused unless the server allows them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    predict_pb2,
)

from serving import wire
from serving.errors import ServingError, invalid_argument
from serving.limits import InFlightBudget, RequestLimits
from serving.metrics import Metrics
from serving.models import ModelManager
from serving.request_log import CLASSIFY, PREDICT, REGRESS, ServerRequestLogger
from serving.servable import Servable

log = logging.getLogger(__name__)

SIGNATURE_DEF_FIELD = "signature_def"
GRPC = "GRPC"
REST = "REST"
# Requests for models the config does not name are counted under one label value, so junk
# names cannot grow the metrics without bound.
UNKNOWN_MODEL_LABEL = "(unknown)"

Response = TypeVar("Response")


class ServingApi:
    """Predict, Classify, Regress, GetModelMetadata, GetModelStatus and config reloads.

    `limits` bound the memory of each request and of all requests in flight; with
    `allow_reload_config` False (the default), HandleReloadConfigRequest is refused with
    PERMISSION_DENIED: whoever reaches the port could otherwise unload the served models or
    load any SavedModel the server can read. With a `request_logger`, successful Predict,
    Classify and Regress requests are sampled for the request log (`serving.request_log`).
    """

    def __init__(
        self,
        manager: ModelManager,
        metrics: Metrics,
        limits: RequestLimits | None = None,
        *,
        allow_reload_config: bool = False,
        request_logger: ServerRequestLogger | None = None,
    ) -> None:
        self.manager = manager
        self.request_logger = request_logger
        self.metrics = metrics
        self.limits = limits or RequestLimits()
        self.budget = InFlightBudget(
            self.limits.max_in_flight_bytes, self.limits.in_flight_wait_seconds
        )
        self.allow_reload_config = allow_reload_config

    # ----------------------------------------------------------------------------------------
    # PredictionService

    def predict(
        self,
        request: predict_pb2.PredictRequest,
        entrypoint: str | None = GRPC,
        *,
        reserved: bool = False,
    ) -> predict_pb2.PredictResponse:
        """Run Predict; `entrypoint` None leaves the metrics to the caller.

        `reserved` says the caller already holds room for the request in the in-flight budget
        (the REST front end reserves it before it reads the body).
        """
        return self._on_servable(
            "Predict",
            entrypoint,
            request,
            lambda s: s.predict(request),
            expanded_bytes=lambda: self.limits.predict_bytes(request.inputs),
            reserved=reserved,
            logged=PREDICT,
        )

    def classify(
        self, request: Any, entrypoint: str | None = GRPC, *, reserved: bool = False
    ) -> Any:
        """Run Classify on a ClassificationRequest read as `wire.SerializedInferenceRequest`."""
        return self._on_servable(
            "Classify",
            entrypoint,
            request,
            lambda s: s.classify(request.model_spec, wire.serialized_examples(request.input)),
            expanded_bytes=lambda: self.limits.examples_bytes(request.input),
            reserved=reserved,
            logged=CLASSIFY,
        )

    def regress(
        self, request: Any, entrypoint: str | None = GRPC, *, reserved: bool = False
    ) -> Any:
        """Run Regress on a RegressionRequest read as `wire.SerializedInferenceRequest`."""
        return self._on_servable(
            "Regress",
            entrypoint,
            request,
            lambda s: s.regress(request.model_spec, wire.serialized_examples(request.input)),
            expanded_bytes=lambda: self.limits.examples_bytes(request.input),
            reserved=reserved,
            logged=REGRESS,
        )

    def get_model_metadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, entrypoint: str | None = GRPC
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        """The signature defs of the version the ModelSpec names, packed as TF Serving does."""

        def metadata(servable: Servable) -> get_model_metadata_pb2.GetModelMetadataResponse:
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = servable.name
            response.model_spec.version.value = servable.version
            response.metadata[SIGNATURE_DEF_FIELD].CopyFrom(servable.signature_def_map_any())
            return response

        def validate() -> None:
            if not request.metadata_field:
                raise invalid_argument(
                    "GetModelMetadataRequest must specify at least one metadata_field"
                )
            for name in request.metadata_field:
                if name != SIGNATURE_DEF_FIELD:
                    raise invalid_argument(f"Metadata field {name} is not supported")

        return self._on_servable("GetModelMetadata", entrypoint, request, metadata, validate)

    # ----------------------------------------------------------------------------------------
    # ModelService

    def get_model_status(
        self, request: get_model_status_pb2.GetModelStatusRequest, entrypoint: str | None = GRPC
    ) -> get_model_status_pb2.GetModelStatusResponse:
        """The state of every version of a model (or of the one version the spec names)."""

        def status() -> get_model_status_pb2.GetModelStatusResponse:
            if not request.HasField("model_spec"):
                raise invalid_argument("Missing ModelSpec")
            spec = request.model_spec
            version = spec.version.value if spec.HasField("version") else None
            response = get_model_status_pb2.GetModelStatusResponse()
            for entry in self.manager.version_statuses(spec.name, version):
                status_proto = response.model_version_status.add(
                    version=entry.version, state=int(entry.state)
                )
                # Always present, as in TF Serving's answer: {"error_code": "OK", ...}.
                status_proto.status.SetInParent()
                if entry.error is not None:
                    status_proto.status.error_code = entry.error.code_number
                    status_proto.status.error_message = entry.error.message
            return response

        return self._observed("GetModelStatus", entrypoint, request.model_spec.name, status)

    def reload_config(
        self,
        request: model_management_pb2.ReloadConfigRequest,
        entrypoint: str | None = GRPC,
        timeout: float | None = None,
    ) -> model_management_pb2.ReloadConfigResponse:
        """Apply a new ModelConfigList; returns once the models it adds are available."""

        def reload() -> model_management_pb2.ReloadConfigResponse:
            if not self.allow_reload_config:
                raise ServingError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "HandleReloadConfigRequest is disabled on this server: start it with "
                    "--allow_reload_config to let clients change the models it serves",
                )
            if request.config.WhichOneof("config") != "model_config_list":
                raise invalid_argument(
                    "ServerModelConfig type not supported by HandleReloadConfigRequest. "
                    "Only ModelConfigList is currently supported"
                )
            self.manager.reload_config(request.config, wait=True, timeout=timeout)
            if self.request_logger is not None:
                self.request_logger.update(request.config)
            response = model_management_pb2.ReloadConfigResponse()
            response.status.SetInParent()
            return response

        return self._observed("HandleReloadConfigRequest", entrypoint, "", reload)

    # ----------------------------------------------------------------------------------------

    def _on_servable(
        self,
        api: str,
        entrypoint: str | None,
        request: Any,
        run: Callable[[Servable], Response],
        validate: Callable[[], None] | None = None,
        *,
        expanded_bytes: Callable[[], int] | None = None,
        reserved: bool = True,
        logged: str | None = None,
    ) -> Response:
        version = [""]

        def call() -> Response:
            if not request.HasField("model_spec"):
                raise invalid_argument("Missing ModelSpec")
            if validate is not None:
                validate()
            # Counted before anything is allocated for the request: its declared shapes may
            # be far larger than the request itself.
            expanded = expanded_bytes() if expanded_bytes is not None else 0
            with contextlib.ExitStack() as stack:
                if not reserved:
                    stack.enter_context(self.budget.reserve(request.ByteSize() + expanded))
                servable = self.manager.servable(request.model_spec)
                version[0] = str(servable.version)
                response = run(servable)
            if logged is not None and self.request_logger is not None:
                self._log_request(logged, request, response, servable)
            return response

        return self._observed(api, entrypoint, request.model_spec.name, call, version)

    def _log_request(self, kind: str, request: Any, response: Any, servable: Servable) -> None:
        """Sample an answered request for the request log; never fails the request."""
        try:
            self.request_logger.log(  # type: ignore[union-attr]
                kind, request, response, servable.name, servable.version
            )
        except Exception:
            log.exception("Request logging failed; the request was answered")

    def _observed(
        self,
        api: str,
        entrypoint: str | None,
        model_name: str,
        call: Callable[[], Response],
        version: list[str] | None = None,
    ) -> Response:
        start = time.perf_counter()
        status = "OK"
        try:
            return call()
        except ServingError as error:
            status = error.code.name
            raise
        except Exception as error:
            status = grpc.StatusCode.INTERNAL.name
            log.exception("%s failed", api)
            raise ServingError(
                grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}"
            ) from error
        finally:
            if entrypoint is not None:
                self.record(
                    api, entrypoint, model_name, version[0] if version else "", status, start
                )

    def record(
        self, api: str, entrypoint: str, model_name: str, version: str, status: str, start: float
    ) -> None:
        """Count one request that started at `start` (a `time.perf_counter()` value)."""
        label = model_name if self.manager.is_configured(model_name) else UNKNOWN_MODEL_LABEL
        if not model_name:
            label = ""
        self.metrics.record_request(
            label, version, api, entrypoint, status, time.perf_counter() - start
        )
