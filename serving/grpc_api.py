"""The gRPC services of TF Serving: `tensorflow.serving.PredictionService` and `ModelService`.

The handlers are registered under the exact service and method names of the
`tensorflow_serving.apis` stubs, so the standard client talks to them unchanged. Classify and
Regress requests are parsed into `wire.SerializedInferenceRequest` (the same bytes, examples kept
serialized); every other message is the stub's own type.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    predict_pb2,
)

from serving import wire
from serving.api import GRPC, ServingApi
from serving.errors import ServingError

log = logging.getLogger(__name__)

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
# A call without a deadline reports a time remaining of centuries, more than a timed wait takes.
_NO_DEADLINE_SECONDS = 365 * 24 * 3600.0


def _time_remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the client's deadline; None when the client set none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE_SECONDS:
        return None
    return remaining


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()


def _unary(
    call: Callable[[Any, grpc.ServicerContext], Any], request_type: Any
) -> grpc.RpcMethodHandler:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return call(request, context)
        except ServingError as error:
            failure = error
        except Exception as error:
            # ServingApi already turns failures into ServingError; this is the last guard.
            log.exception("Unexpected error in a gRPC handler")
            failure = ServingError(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
        context.abort(failure.code, failure.message)

    return grpc.unary_unary_rpc_method_handler(
        handle, request_deserializer=request_type.FromString, response_serializer=_serialize
    )


def service_handlers(api: ServingApi) -> list[grpc.GenericRpcHandler]:
    """Generic handlers for both services, ready for `grpc.Server.add_generic_rpc_handlers`."""
    inference_request = wire.inference_request_type()
    prediction = {
        "Predict": _unary(lambda r, _: api.predict(r, GRPC), predict_pb2.PredictRequest),
        "Classify": _unary(lambda r, _: api.classify(r, GRPC), inference_request),
        "Regress": _unary(lambda r, _: api.regress(r, GRPC), inference_request),
        "GetModelMetadata": _unary(
            lambda r, _: api.get_model_metadata(r, GRPC),
            get_model_metadata_pb2.GetModelMetadataRequest,
        ),
    }
    model = {
        "GetModelStatus": _unary(
            lambda r, _: api.get_model_status(r, GRPC),
            get_model_status_pb2.GetModelStatusRequest,
        ),
        "HandleReloadConfigRequest": _unary(
            lambda r, context: api.reload_config(r, GRPC, timeout=_time_remaining(context)),
            model_management_pb2.ReloadConfigRequest,
        ),
    }
    return [
        grpc.method_handlers_generic_handler(PREDICTION_SERVICE, prediction),
        grpc.method_handlers_generic_handler(MODEL_SERVICE, model),
    ]
