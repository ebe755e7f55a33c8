"""Errors that carry the canonical status code TensorFlow Serving answers with.

Every failure a request or a model load can meet is a `ServingError` with a gRPC status code.
The gRPC API returns the code as is; the REST API maps it to the HTTP status TF Serving uses.
"""

from __future__ import annotations

import re

import grpc

# TF Serving's `ToHTTPStatusCode` (model_servers/http_server.cc).
_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

_CODE_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}

# Lines TensorFlow's eager runtime wraps around a kernel error; TF Serving's session errors
# carry only the kernel message and the node, so these are dropped.
_EAGER_NOISE = re.compile(
    r"^(Graph execution error:|Detected at node .*|<stack traces unavailable>)\s*$"
)
_OP_SUFFIX = re.compile(r"\s*\[Op:[^\]]*\]\s*$")


class ServingError(Exception):
    """A failed request or load, with the status code TF Serving would return for it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def code_number(self) -> int:
        """The numeric code, as in `tensorflow.error.Code` and `StatusProto.error_code`."""
        return self.code.value[0]

    @property
    def http_status(self) -> int:
        """The HTTP status TF Serving's REST API answers this error with."""
        return _HTTP_STATUS.get(self.code, 500)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def invalid_argument(message: str) -> ServingError:
    """A request that names or shapes something wrongly."""
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def failed_precondition(message: str) -> ServingError:
    """A request that the model cannot answer as asked (e.g. a missing signature)."""
    return ServingError(grpc.StatusCode.FAILED_PRECONDITION, message)


def not_found(message: str) -> ServingError:
    """An unknown model, version or file."""
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


def code_from_number(number: int) -> grpc.StatusCode:
    """The gRPC status code with this number (`tensorflow.error.Code` uses the same numbers)."""
    return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def clean_tf_message(message: str) -> str:
    """A TensorFlow runtime error message without the eager runtime's wrapping lines."""
    lines = [line for line in message.splitlines() if not _EAGER_NOISE.match(line.strip())]
    text = "\n".join(line for line in lines if line.strip())
    return _OP_SUFFIX.sub("", text).strip()


def as_serving_error(error: BaseException) -> ServingError:
    """Classify any exception raised while loading or running a model.

    TensorFlow's own errors keep their code; a SavedModel that cannot be read is NOT_FOUND or
    DATA_LOSS as in TF Serving's loader; anything else is UNKNOWN with its message.
    """
    if isinstance(error, ServingError):
        return error
    # Imported here: this module stays importable without TensorFlow for the REST/gRPC mapping.
    import tensorflow as tf

    if isinstance(error, tf.errors.OpError):
        return ServingError(code_from_number(error.error_code), clean_tf_message(error.message))
    text = str(error) or type(error).__name__
    if isinstance(error, OSError):
        if "Cannot parse" in text or "Error parsing" in text:
            return ServingError(grpc.StatusCode.DATA_LOSS, text)
        return ServingError(grpc.StatusCode.NOT_FOUND, text)
    return ServingError(grpc.StatusCode.UNKNOWN, f"{type(error).__name__}: {text}")
