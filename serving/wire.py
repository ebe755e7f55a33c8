"""Classify and Regress requests read with their examples left as serialized bytes.

`tensorflow.serving.Input` holds `tf.Example` messages, but the model only wants them serialized
again. TF Serving reads the request through a twin message whose example fields are `bytes`
(`apis/internal/serialized_input.proto`) and never materialises an Example. The messages below
are the same twin, built from a descriptor: same field numbers, so the standard client's bytes
parse into them unchanged, and the examples reach the model without a Python object per example.
"""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from tensorflow_serving.apis import model_pb2

_PACKAGE = "widedeep.serving"
_FILE = "widedeep/serving/serialized_input.proto"


def _field(
    name: str, number: int, kind: int, *, repeated: bool = False, type_name: str = ""
) -> descriptor_pb2.FieldDescriptorProto:
    label = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
    if not repeated:
        label = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    field = descriptor_pb2.FieldDescriptorProto(name=name, number=number, type=kind, label=label)
    if type_name:
        field.type_name = type_name
    return field


@functools.cache
def _message_classes() -> dict[str, Any]:
    bytes_type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
    message_type = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
    proto = descriptor_pb2.FileDescriptorProto(
        name=_FILE,
        package=_PACKAGE,
        syntax="proto3",
        dependency=[model_pb2.DESCRIPTOR.name],
    )
    proto.message_type.add(
        name="SerializedExampleList", field=[_field("examples", 1, bytes_type, repeated=True)]
    )
    proto.message_type.add(
        name="SerializedExampleListWithContext",
        field=[
            _field("examples", 1, bytes_type, repeated=True),
            _field("context", 2, bytes_type),
        ],
    )
    serialized_input = proto.message_type.add(name="SerializedInput")
    serialized_input.oneof_decl.add(name="kind")
    for number, (name, type_name) in enumerate(
        [
            ("example_list", "SerializedExampleList"),
            ("example_list_with_context", "SerializedExampleListWithContext"),
        ],
        start=1,
    ):
        field = _field(name, number, message_type, type_name=f".{_PACKAGE}.{type_name}")
        field.oneof_index = 0
        serialized_input.field.append(field)
    # ClassificationRequest and RegressionRequest share this layout: model_spec = 1, input = 2.
    proto.message_type.add(
        name="SerializedInferenceRequest",
        field=[
            _field("model_spec", 1, message_type, type_name=".tensorflow.serving.ModelSpec"),
            _field("input", 2, message_type, type_name=f".{_PACKAGE}.SerializedInput"),
        ],
    )
    pool = descriptor_pool.Default()
    try:
        file_descriptor = pool.FindFileByName(_FILE)
    except KeyError:
        file_descriptor = pool.Add(proto)
        file_descriptor = pool.FindFileByName(_FILE)
    return {
        name: message_factory.GetMessageClass(file_descriptor.message_types_by_name[name])
        for name in ("SerializedInput", "SerializedInferenceRequest")
    }


def inference_request_type() -> Any:
    """The message class that parses a Classification- or RegressionRequest's bytes."""
    return _message_classes()["SerializedInferenceRequest"]


def parse_inference_request(data: bytes) -> Any:
    """Parse a serialized ClassificationRequest or RegressionRequest, examples left as bytes."""
    return inference_request_type().FromString(data)


def serialized_examples(serialized_input: Any) -> list[bytes]:
    """The examples of a `SerializedInput`, each with the context merged in.

    Concatenating two serialized messages is a proto merge, so context + example gives the
    example with the context's features added and the example's own values winning on a clash:
    what TF Serving does (`InputToSerializedExampleTensor`).
    """
    kind = serialized_input.WhichOneof("kind")
    if kind == "example_list":
        return list(serialized_input.example_list.examples)
    if kind == "example_list_with_context":
        with_context = serialized_input.example_list_with_context
        context = with_context.context
        if not context:
            return list(with_context.examples)
        return [context + example for example in with_context.examples]
    return []


def reparse_request(request: Any) -> Any:
    """A standard Classification- or RegressionRequest as its serialized-examples twin."""
    return parse_inference_request(request.SerializeToString())
