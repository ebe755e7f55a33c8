"""Bounds on the memory requests take: per request, and over all the requests in flight.

A request can be small on the wire and still declare a tensor far larger than itself (a
TensorProto whose single value fills a huge shape, or a Classify context merged into every
example), and many large requests at once can exhaust memory even when each one is allowed.
So, before anything is allocated for a request:

- every input tensor's declared shape must agree with the values it carries, and the bytes its
  tensors take once expanded (declared elements x element size) are counted and bounded per
  request (`RequestLimits.max_request_tensor_bytes`);
- the bytes of every request being answered (its size plus that expansion) are held against one
  budget (`InFlightBudget`): a request that does not fit waits for room for a while, then gets
  RESOURCE_EXHAUSTED. Requests answered before it leave the budget as they finish.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from tensorflow.core.framework import tensor_pb2, types_pb2

from serving.errors import ServingError, invalid_argument

MIB = 1 << 20
DEFAULT_MAX_REQUEST_BYTES = 64 * MIB
"""Largest request on either API (a gRPC message, a REST body), as TF Serving's
`grpc.max_receive_message_length` channel argument bounds gRPC."""
DEFAULT_MAX_REQUEST_TENSOR_BYTES = 256 * MIB
DEFAULT_MAX_IN_FLIGHT_BYTES = 1024 * MIB
DEFAULT_IN_FLIGHT_WAIT_SECONDS = 5.0
MAX_TENSOR_ELEMENTS = 1 << 28

STRING_ELEMENT_BYTES = 64
"""Memory a string element takes besides its bytes: a Python bytes object and its list slot
while the tensor is built, then TensorFlow's string header."""
JSON_VALUE_BYTES = 64
"""Memory one JSON value may take while a REST body is parsed into values, arrays and tensor
protos: a number written in two characters becomes a Python object, a list slot and an array
element. Measured: a body of one-digit numbers takes 22 to 30 times its size, one of base64
examples 2.6 times."""


def json_body_bytes(body: bytes) -> int:
    """An upper bound of the memory a REST body takes while it is parsed, besides itself.

    Values are counted by the separators between them (',' and ':'), without parsing.
    """
    values = body.count(b",") + body.count(b":") + 1
    return 3 * len(body) + JSON_VALUE_BYTES * values


def default_rest_api_num_threads() -> int:
    """TF Serving's default for `--rest_api_num_threads`: four per CPU."""
    return 4 * (os.cpu_count() or 1)


# The TensorProto field holding each dtype's values, as `Tensor::AsProtoField` writes them,
# with how many entries one element takes and its size in memory.
@dataclass(frozen=True)
class _DtypeLayout:
    field: str
    itemsize: int
    entries_per_element: int = 1


_LAYOUTS: dict[int, _DtypeLayout] = {
    types_pb2.DT_FLOAT: _DtypeLayout("float_val", 4),
    types_pb2.DT_DOUBLE: _DtypeLayout("double_val", 8),
    types_pb2.DT_INT32: _DtypeLayout("int_val", 4),
    types_pb2.DT_INT16: _DtypeLayout("int_val", 2),
    types_pb2.DT_INT8: _DtypeLayout("int_val", 1),
    types_pb2.DT_UINT8: _DtypeLayout("int_val", 1),
    types_pb2.DT_UINT16: _DtypeLayout("int_val", 2),
    types_pb2.DT_STRING: _DtypeLayout("string_val", 0),
    types_pb2.DT_INT64: _DtypeLayout("int64_val", 8),
    types_pb2.DT_BOOL: _DtypeLayout("bool_val", 1),
    types_pb2.DT_UINT32: _DtypeLayout("uint32_val", 4),
    types_pb2.DT_UINT64: _DtypeLayout("uint64_val", 8),
    types_pb2.DT_HALF: _DtypeLayout("half_val", 2),
    types_pb2.DT_BFLOAT16: _DtypeLayout("half_val", 2),
    types_pb2.DT_COMPLEX64: _DtypeLayout("scomplex_val", 8, 2),
    types_pb2.DT_COMPLEX128: _DtypeLayout("dcomplex_val", 16, 2),
}

VALUE_FIELDS: dict[int, str] = {
    dtype: layout.field for dtype, layout in _LAYOUTS.items() if layout.entries_per_element == 1
}
"""The typed value field of each (real-valued) dtype, as TF Serving fills answers."""


def _dtype_name(dtype: int) -> str:
    try:
        return types_pb2.DataType.Name(dtype).removeprefix("DT_").lower()
    except ValueError:
        return f"unknown dtype {dtype}"


def _shape_text(dims: list[int]) -> str:
    return "[" + ",".join(str(size) for size in dims) + "]"


def tensor_bytes(alias: str, proto: tensor_pb2.TensorProto) -> int:
    """The bytes an input tensor takes once expanded to its declared shape; checks it first.

    Refuses (INVALID_ARGUMENT) a shape with a negative or unknown dimension, more than
    `MAX_TENSOR_ELEMENTS` elements, a dtype a request cannot carry, and values that do not
    match the shape: a tensor carries one value per element, or a single value that fills the
    shape (what `tf.make_tensor_proto` writes for a constant), or `tensor_content` of exactly
    elements x element size. Nothing is allocated here.
    """
    if proto.tensor_shape.unknown_rank:
        raise invalid_argument(f"tensor parsing error: {alias} (the shape has an unknown rank)")
    dims = [dim.size for dim in proto.tensor_shape.dim]
    if any(size < 0 for size in dims):
        raise invalid_argument(
            f"tensor parsing error: {alias} (shape {_shape_text(dims)} has a negative dimension)"
        )
    elements = math.prod(dims)
    if elements > MAX_TENSOR_ELEMENTS:
        raise invalid_argument(
            f"tensor parsing error: {alias} (shape {_shape_text(dims)} of {elements:,} elements "
            f"exceeds the limit of {MAX_TENSOR_ELEMENTS:,})"
        )
    layout = _LAYOUTS.get(proto.dtype)
    if layout is None:
        raise invalid_argument(
            f"tensor parsing error: {alias} (dtype {_dtype_name(proto.dtype)} is not supported "
            "in a request)"
        )
    entries = len(getattr(proto, layout.field))
    content = len(proto.tensor_content)
    shape = f"shape {_shape_text(dims)} of {_dtype_name(proto.dtype)}"
    if proto.dtype == types_pb2.DT_STRING:
        if content:
            raise invalid_argument(
                f"tensor parsing error: {alias} (a string tensor cannot use tensor_content)"
            )
        if entries == elements:
            # The strings are in the request already: each is copied once more, with a header.
            return proto.ByteSize() + STRING_ELEMENT_BYTES * elements
        if entries == 1:
            return elements * (len(proto.string_val[0]) + STRING_ELEMENT_BYTES)
        raise _values_mismatch(alias, shape, elements, entries)
    expanded = elements * layout.itemsize
    if content:
        if content != expanded:
            raise invalid_argument(
                f"tensor parsing error: {alias} ({shape} takes {expanded:,} bytes but "
                f"tensor_content holds {content:,})"
            )
        return expanded
    if entries % layout.entries_per_element:
        raise invalid_argument(
            f"tensor parsing error: {alias} ({layout.field} holds an odd number of parts)"
        )
    values = entries // layout.entries_per_element
    if values == elements or values == 1:
        return expanded
    raise _values_mismatch(alias, shape, elements, values)


def _values_mismatch(alias: str, shape: str, elements: int, values: int) -> ServingError:
    return invalid_argument(
        f"tensor parsing error: {alias} ({shape} has {elements:,} elements but {values:,} "
        "values were sent; send one value per element, or a single value to fill the shape)"
    )


@dataclass(frozen=True)
class RequestLimits:
    """How much memory requests may take.

    Attributes:
      max_request_tensor_bytes: Bytes one request's inputs may take once expanded to their
        declared shapes (or its examples once merged with their context).
      max_in_flight_bytes: Bytes of all requests being answered at once: each one's size plus
        that expansion (for a REST body, what parsing its JSON takes: `json_body_bytes`).
      in_flight_wait_seconds: How long a request waits for room in that budget before it is
        refused with RESOURCE_EXHAUSTED.
    """

    max_request_tensor_bytes: int = DEFAULT_MAX_REQUEST_TENSOR_BYTES
    max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT_BYTES
    in_flight_wait_seconds: float = DEFAULT_IN_FLIGHT_WAIT_SECONDS

    def check_tensor_bytes(self, expanded: int, what: str) -> None:
        """Refuses a request whose inputs would take more than `max_request_tensor_bytes`."""
        if expanded > self.max_request_tensor_bytes:
            raise ServingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{what} would take {expanded:,} bytes in memory; a request may take at most "
                f"{self.max_request_tensor_bytes:,} bytes (--max_request_tensor_bytes)",
            )

    def predict_bytes(self, inputs: Any) -> int:
        """Checks a Predict request's input tensors; returns the bytes they expand to."""
        expanded = sum(tensor_bytes(alias, proto) for alias, proto in inputs.items())
        self.check_tensor_bytes(expanded, "the input tensors of this request")
        return expanded

    def examples_bytes(self, serialized_input: Any) -> int:
        """The bytes a Classify or Regress request's examples take once merged with their
        context (each example gets its own copy of it); refuses too many."""
        kind = serialized_input.WhichOneof("kind")
        if kind == "example_list":
            examples = serialized_input.example_list.examples
            context = 0
        elif kind == "example_list_with_context":
            examples = serialized_input.example_list_with_context.examples
            context = len(serialized_input.example_list_with_context.context)
        else:
            return 0
        count = len(examples)
        expanded = serialized_input.ByteSize() + count * (context + STRING_ELEMENT_BYTES)
        self.check_tensor_bytes(expanded, f"the {count:,} examples of this request")
        return expanded


class InFlightBudget:
    """The bytes of the requests being answered, kept under a limit.

    `reserve(n)` holds n bytes while a request is answered. A request larger than the whole
    budget is refused at once; one that does not fit now waits up to `wait_seconds` for
    requests in flight to finish, then is refused. Both refusals are RESOURCE_EXHAUSTED (HTTP
    429), which tells a client to retry later.
    """

    def __init__(self, limit: int, wait_seconds: float) -> None:
        self.limit = limit
        self.wait_seconds = wait_seconds
        self._used = 0
        self._waiting = 0
        self.changed = threading.Condition()
        """Notified whenever a request starts waiting for room, gets it, or gives it back."""

    @property
    def used(self) -> int:
        """Bytes held by requests in flight now."""
        return self._used

    @property
    def waiting(self) -> int:
        """Requests waiting for room now."""
        return self._waiting

    @contextlib.contextmanager
    def reserve(self, nbytes: int, what: str = "this request") -> Iterator[None]:
        """Hold `nbytes` of the budget for the duration of the block."""
        if nbytes > self.limit:
            raise ServingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{what} needs {nbytes:,} bytes in memory, more than the server allows for all "
                f"requests in flight ({self.limit:,} bytes, --max_in_flight_bytes)",
            )
        deadline = time.monotonic() + self.wait_seconds
        with self.changed:
            self._waiting += 1
            self.changed.notify_all()
            try:
                while self._used + nbytes > self.limit:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ServingError(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"the server is busy: requests in flight hold {self._used:,} of "
                            f"{self.limit:,} bytes (--max_in_flight_bytes) and {what} needs "
                            f"{nbytes:,}; retry later",
                        )
                    self.changed.wait(remaining)
                self._used += nbytes
            finally:
                self._waiting -= 1
                self.changed.notify_all()
        try:
            yield
        finally:
            with self.changed:
                self._used -= nbytes
                self.changed.notify_all()
