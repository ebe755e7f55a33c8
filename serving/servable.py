"""One loaded version of a model and the inference APIs TF Serving runs on it.

A `Servable` is a SavedModel read with `tf.saved_model.load`, its signature defs as written in
`saved_model.pb` (what GetModelMetadata returns), and Predict, Classify and Regress implemented
with TF Serving's rules: which signature is used, how the request is checked, which error comes
back and how the response is laid out (servables/tensorflow/{predict_util,classifier,regressor}.cc).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import any_pb2, message, text_format
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    model_pb2,
    predict_pb2,
    prediction_log_pb2,
    regression_pb2,
)

from serving import wire
from serving.errors import (
    ServingError,
    as_serving_error,
    failed_precondition,
    invalid_argument,
    not_found,
)
from serving.limits import VALUE_FIELDS, tensor_bytes
from transform.artifacts import (
    CLASSES_OUTPUT,
    CLASSIFY_INPUT,
    SCORES_OUTPUT,
    SERVING_SIGNATURE,
    warmup_path,
)

log = logging.getLogger(__name__)

# TF Serving's own names, which the exported models follow (see transform.artifacts).
DEFAULT_SIGNATURE = SERVING_SIGNATURE
CLASSIFY_INPUTS = CLASSIFY_INPUT
CLASSIFY_CLASSES = CLASSES_OUTPUT
CLASSIFY_SCORES = SCORES_OUTPUT
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
REGRESS_INPUTS = "inputs"
REGRESS_OUTPUTS = "outputs"
WARMUP_MAX_RECORDS = 1000


@dataclass(frozen=True)
class ServableOptions:
    """How a version is loaded.

    `enable_signature_method_name_check` mirrors TF Serving's flag of that name, off by default
    there too: `tf.saved_model.save` writes every signature as a predict method.
    `warmup_pause_ratio` paces the warmup: after each record, the loading thread waits that
    many times as long as the record took, so a version warming up beside a served one leaves
    the served one most of the machine.
    """

    tags: tuple[str, ...] = ("serve",)
    enable_model_warmup: bool = True
    enable_signature_method_name_check: bool = False
    warmup_pause_ratio: float = 0.0


def dtype_name(dtype: int) -> str:
    """TensorFlow's short name of a DataType enum value, as in its error messages ('float')."""
    try:
        return types_pb2.DataType.Name(dtype).removeprefix("DT_").lower()
    except ValueError:
        return f"unknown dtype {dtype}"


def read_meta_graph(path: Path, tags: Sequence[str]) -> meta_graph_pb2.MetaGraphDef:
    """The MetaGraphDef with exactly `tags` from the SavedModel at `path`."""
    saved_model = saved_model_pb2.SavedModel()
    binary, text = path / "saved_model.pb", path / "saved_model.pbtxt"
    try:
        if binary.is_file():
            saved_model.ParseFromString(binary.read_bytes())
        elif text.is_file():
            text_format.Parse(text.read_text(), saved_model)
        else:
            raise not_found(
                f"Could not find SavedModel .pb or .pbtxt at supplied export directory path: {path}"
            )
    except (message.DecodeError, text_format.ParseError) as error:
        raise ServingError(
            grpc.StatusCode.DATA_LOSS, f"Can't parse {binary} as binary proto: {error}"
        ) from error
    wanted = set(tags)
    for meta_graph in saved_model.meta_graphs:
        if set(meta_graph.meta_info_def.tags) == wanted:
            return meta_graph
    raise not_found(
        f"Could not find meta graph def matching supplied tags: {{ {' '.join(sorted(wanted))} }}. "
        "To inspect available tag-sets in the SavedModel, please use the SavedModel CLI: "
        "`saved_model_cli`"
    )


def tensor_proto_from_array(array: np.ndarray, dtype: int, proto: tensor_pb2.TensorProto) -> None:
    """Fill `proto` with `array` the way `Tensor::AsProtoField` does (typed value fields)."""
    proto.dtype = dtype
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    field = VALUE_FIELDS.get(dtype)
    if field is None:
        proto.MergeFrom(tf.make_tensor_proto(array))
        return
    flat = array.ravel()
    if dtype in (types_pb2.DT_HALF, types_pb2.DT_BFLOAT16):
        flat = flat.view(np.uint16)
    getattr(proto, field).extend(flat.tolist())


def _keys(mapping: Iterable[str]) -> str:
    return ",".join(sorted(mapping))


def _debug_string(signature: meta_graph_pb2.SignatureDef) -> str:
    return text_format.MessageToString(signature)


class Servable:
    """A loaded, warmed-up model version: answers Predict, Classify, Regress and metadata."""

    def __init__(
        self,
        name: str,
        version: int,
        path: Path,
        meta_graph: meta_graph_pb2.MetaGraphDef,
        loaded: Any,
        options: ServableOptions,
    ) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.options = options
        self.warmup_records = 0
        self.signature_defs: Mapping[str, meta_graph_pb2.SignatureDef] = dict(
            meta_graph.signature_def
        )
        # Keeps the variables alive for as long as the functions are used.
        self._loaded = loaded
        self._functions: dict[str, Any] = {
            key: loaded.signatures[key] for key in self.signature_defs if key in loaded.signatures
        }
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, signature in self.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(signature)
        self._signature_map_any = any_pb2.Any()
        self._signature_map_any.Pack(signature_map)

    @classmethod
    def load(cls, name: str, version: int, path: Path, options: ServableOptions) -> Servable:
        """Load the SavedModel at `path` and replay its warmup requests.

        Raises `ServingError` with the code TF Serving reports for the failed load.
        """
        start = time.perf_counter()
        meta_graph = read_meta_graph(path, options.tags)
        try:
            loaded = tf.saved_model.load(str(path), tags=list(options.tags))
        except Exception as error:
            raise as_serving_error(error) from error
        servable = cls(name, version, path, meta_graph, loaded, options)
        if options.enable_model_warmup:
            servable.warmup_records = servable.run_warmup()
        log.info(
            "Loaded servable version {name: %s version: %d} from %s in %.0f ms (%d warmup records)",
            name,
            version,
            path,
            (time.perf_counter() - start) * 1000,
            servable.warmup_records,
        )
        return servable

    # ----------------------------------------------------------------------------------------
    # Metadata

    def signature_def_map_any(self) -> any_pb2.Any:
        """The `SignatureDefMap` of this version packed in an Any, as GetModelMetadata returns."""
        return self._signature_map_any

    def _response_model_spec(
        self, spec: model_pb2.ModelSpec, request_name: str, signature_name: str
    ) -> None:
        spec.name = request_name
        spec.version.value = self.version
        spec.signature_name = signature_name or DEFAULT_SIGNATURE

    # ----------------------------------------------------------------------------------------
    # Predict

    def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        """Run the named signature (default `serving_default`) on the request's tensors."""
        signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        signature = self.signature_defs.get(signature_name)
        function = self._functions.get(signature_name)
        if signature is None or function is None:
            raise failed_precondition(f'Serving signature key "{signature_name}" not found.')
        self._check_predict_method(signature)
        inputs = self._predict_inputs(signature, request.inputs)
        aliases = self._output_aliases(signature, request.output_filter)
        outputs = self._run(function, inputs)
        response = predict_pb2.PredictResponse()
        self._response_model_spec(response.model_spec, request.model_spec.name, signature_name)
        for alias in aliases:
            tensor = outputs[alias]
            tensor_proto_from_array(
                tensor.numpy(), tensor.dtype.as_datatype_enum, response.outputs[alias]
            )
        return response

    def _check_predict_method(self, signature: meta_graph_pb2.SignatureDef) -> None:
        if self.options.enable_signature_method_name_check and signature.method_name not in (
            PREDICT_METHOD,
            CLASSIFY_METHOD,
            REGRESS_METHOD,
        ):
            raise ServingError(
                grpc.StatusCode.INTERNAL,
                "Expected prediction signature method_name to be one of "
                f"{{{PREDICT_METHOD}, {CLASSIFY_METHOD}, {REGRESS_METHOD}}}. "
                f"Was: {signature.method_name}",
            )

    def _predict_inputs(
        self,
        signature: meta_graph_pb2.SignatureDef,
        request_inputs: Mapping[str, tensor_pb2.TensorProto],
    ) -> dict[str, tf.Tensor]:
        sent, expected = set(request_inputs), set(signature.inputs)
        if len(sent) > len(expected) or (len(sent) < len(expected) and not signature.defaults):
            raise invalid_argument(
                f"input size does not match signature: {len(sent)}!={len(expected)} "
                f"len({{{_keys(sent)}}}) != len({{{_keys(expected)}}}). "
                f"Sent extra: {{{_keys(sent - expected)}}}. "
                f"Missing but required: {{{_keys(expected - sent)}}}."
            )
        order = sorted(expected)
        tensors: dict[str, tf.Tensor] = {}
        for alias, proto in request_inputs.items():
            info = signature.inputs.get(alias)
            if info is None:
                raise invalid_argument(
                    f"input tensor alias not found in signature: {alias}. "
                    f"Inputs expected to be in the set {{{_keys(expected)}}}."
                )
            if proto.dtype != info.dtype:
                raise invalid_argument(
                    f"Expects arg[{order.index(alias)}] to be {dtype_name(info.dtype)} but "
                    f"{dtype_name(proto.dtype)} is provided"
                )
            # Checks the shape against the values before anything is allocated: a short proto
            # may declare a huge shape, or fewer values than its shape holds.
            tensor_bytes(alias, proto)
            dims = [dim.size for dim in proto.tensor_shape.dim]
            elements = math.prod(dims)
            try:
                if proto.dtype == types_pb2.DT_STRING and len(proto.string_val) == elements:
                    # The usual request (serialized tf.Examples): straight from the repeated
                    # field, a third of the time of a numpy object array in between.
                    tensors[alias] = tf.constant(list(proto.string_val), tf.string, shape=dims)
                else:
                    array = tf.make_ndarray(proto)
                    tensors[alias] = tf.constant(array, dtype=tf.dtypes.as_dtype(info.dtype))
            except Exception as error:
                raise invalid_argument(f"tensor parsing error: {alias}") from error
        missing = expected - sent
        if missing:
            # Signature defaults are not exposed by a loaded function: every input must be sent.
            raise invalid_argument(
                f"Missing but required: {{{_keys(missing)}}} (signature defaults are not supported)"
            )
        return tensors

    @staticmethod
    def _output_aliases(
        signature: meta_graph_pb2.SignatureDef, output_filter: Sequence[str]
    ) -> list[str]:
        if not output_filter:
            return list(signature.outputs)
        seen: list[str] = []
        for alias in output_filter:
            if alias not in signature.outputs:
                raise invalid_argument(
                    f"output tensor alias not found in signature: {alias} "
                    f"Outputs expected to be in the set {{{_keys(signature.outputs)}}}."
                )
            if alias in seen:
                raise invalid_argument(f"duplicate output tensor alias: {alias}")
            seen.append(alias)
        return seen

    @staticmethod
    def _run(
        function: Callable[..., Mapping[str, tf.Tensor]], inputs: Mapping[str, tf.Tensor]
    ) -> Mapping[str, tf.Tensor]:
        try:
            return function(**inputs)
        except UnicodeDecodeError as error:
            # TensorFlow quotes the offending input in its message and fails to decode it.
            raise invalid_argument(
                "The model refused an input that is not valid UTF-8 text (is it a serialized "
                f"tf.Example?); its error message could not be decoded: {error}"
            ) from error
        except (tf.errors.OpError, TypeError, ValueError) as error:
            served = as_serving_error(error)
            if served.code == grpc.StatusCode.UNKNOWN:
                # A tensor the function refuses before running (shape or type) is the
                # caller's mistake, as a bad feed is in TF Serving's Session::Run.
                served = invalid_argument(served.message)
            raise served from error

    # ----------------------------------------------------------------------------------------
    # Classify and Regress

    def _inference_signature(
        self, spec: model_pb2.ModelSpec, method: str, kind: str
    ) -> tuple[str, meta_graph_pb2.SignatureDef, Any]:
        signature_name = spec.signature_name or DEFAULT_SIGNATURE
        signature = self.signature_defs.get(signature_name)
        function = self._functions.get(signature_name)
        if signature is None or function is None:
            raise invalid_argument(f"No signature was found with the name: {signature_name}")
        if self.options.enable_signature_method_name_check and signature.method_name != method:
            raise invalid_argument(
                f"Expected {kind} signature method_name to be {method}. "
                f"Was: {signature.method_name}"
            )
        return signature_name, signature, function

    @staticmethod
    def _examples_tensor(examples: Sequence[bytes]) -> tf.Tensor:
        if not examples:
            raise invalid_argument("Input is empty.")
        return tf.constant(examples, dtype=tf.string)

    def classify(
        self, spec: model_pb2.ModelSpec, examples: Sequence[bytes]
    ) -> classification_pb2.ClassificationResponse:
        """Classify serialized examples with the named signature (default `serving_default`).

        The signature must take one input `inputs` and return `classes` and/or `scores`
        shaped [batch, num_classes], as TF Serving's classifier requires.
        """
        signature_name, signature, function = self._inference_signature(
            spec, CLASSIFY_METHOD, "classification"
        )
        if len(signature.inputs) != 1:
            raise invalid_argument("Expected one input Tensor.")
        if len(signature.outputs) not in (1, 2):
            raise invalid_argument(
                f"Expected one or two output Tensors, found {len(signature.outputs)}"
            )
        if CLASSIFY_INPUTS not in signature.inputs:
            raise failed_precondition(
                f"No classification inputs found in SignatureDef: {_debug_string(signature)}"
            )
        if CLASSIFY_CLASSES not in signature.outputs and CLASSIFY_SCORES not in signature.outputs:
            raise failed_precondition(
                "Expected classification signature outputs to contain at least one of "
                f'"{CLASSIFY_CLASSES}" or "{CLASSIFY_SCORES}". '
                f"Signature was: {_debug_string(signature)}"
            )
        num_examples = len(examples)
        outputs = self._run(function, {CLASSIFY_INPUTS: self._examples_tensor(examples)})
        classes = outputs.get(CLASSIFY_CLASSES) if CLASSIFY_CLASSES in signature.outputs else None
        scores = outputs.get(CLASSIFY_SCORES) if CLASSIFY_SCORES in signature.outputs else None
        classes_array = _checked_matrix(classes, tf.string, "classes", num_examples)
        scores_array = _checked_matrix(scores, tf.float32, "scores", num_examples)
        num_classes = 0
        if (
            classes_array is not None
            and scores_array is not None
            and classes_array.shape[1] != scores_array.shape[1]
        ):
            raise invalid_argument(
                "Tensors class and score should match in dim_size(1). Got "
                f"{classes_array.shape[1]} vs. {scores_array.shape[1]}"
            )
        for array in (classes_array, scores_array):
            if array is not None:
                num_classes = array.shape[1]
        response = classification_pb2.ClassificationResponse()
        self._response_model_spec(response.model_spec, spec.name, signature_name)
        result = response.result
        labels = classes_array.tolist() if classes_array is not None else None
        values = scores_array.tolist() if scores_array is not None else None
        for row in range(num_examples):
            classifications = result.classifications.add().classes
            for column in range(num_classes):
                entry = classifications.add()
                if labels is not None:
                    entry.label = _label(labels[row][column])
                if values is not None:
                    entry.score = values[row][column]
        return response

    def regress(
        self, spec: model_pb2.ModelSpec, examples: Sequence[bytes]
    ) -> regression_pb2.RegressionResponse:
        """Regress serialized examples: one input `inputs`, one output `outputs` [batch(, 1)]."""
        signature_name, signature, function = self._inference_signature(
            spec, REGRESS_METHOD, "regression"
        )
        if len(signature.inputs) != 1:
            raise invalid_argument("Expected one input Tensor.")
        if len(signature.outputs) != 1:
            raise invalid_argument("Expected one output Tensor.")
        if REGRESS_INPUTS not in signature.inputs:
            raise failed_precondition(
                f"No regression inputs found in SignatureDef: {_debug_string(signature)}"
            )
        if REGRESS_OUTPUTS not in signature.outputs:
            raise failed_precondition(
                f"No regression outputs found in SignatureDef: {_debug_string(signature)}"
            )
        num_examples = len(examples)
        outputs = self._run(function, {REGRESS_INPUTS: self._examples_tensor(examples)})
        tensor = outputs[REGRESS_OUTPUTS]
        shape = tensor.shape
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            raise invalid_argument(
                "Expected output Tensor shape to be either [batch_size] or [batch_size, 1] "
                f"but got {list(shape)}"
            )
        if shape[0] != num_examples:
            raise invalid_argument(
                f"Input batch size did not match output batch size: {num_examples} vs. {shape[0]}"
            )
        if tensor.dtype != tf.float32:
            raise invalid_argument(
                f"Expected output Tensor of DT_FLOAT.  Got: {_enum_name(tensor.dtype)}"
            )
        response = regression_pb2.RegressionResponse()
        self._response_model_spec(response.model_spec, spec.name, signature_name)
        regressions = response.result.regressions
        for value in tensor.numpy().ravel().tolist():
            regressions.add(value=value)
        return response

    # ----------------------------------------------------------------------------------------
    # Warmup

    def run_warmup(self) -> int:
        """Replay `assets.extra/tf_serving_warmup_requests`; returns the number of records.

        Any failing record fails the load, as in TF Serving: a version that cannot answer its
        own warmup requests must not start serving.
        """
        path = warmup_path(self.path)
        if not path.is_file():
            return 0
        count = 0
        try:
            for record in tf.data.TFRecordDataset(str(path)):
                count += 1
                if count > WARMUP_MAX_RECORDS:
                    raise invalid_argument(
                        f"Number of warmup records exceeds the maximum ({WARMUP_MAX_RECORDS}) "
                        f"at {path}"
                    )
                data = record.numpy()
                try:
                    prediction_log = prediction_log_pb2.PredictionLog.FromString(data)
                except message.DecodeError as error:
                    raise invalid_argument(
                        f"Failed to parse warmup record: {data!r} from {path}"
                    ) from error
                started = time.perf_counter()
                self._replay(prediction_log)
                if self.options.warmup_pause_ratio > 0:
                    time.sleep((time.perf_counter() - started) * self.options.warmup_pause_ratio)
        except tf.errors.DataLossError as error:
            raise ServingError(
                grpc.StatusCode.DATA_LOSS,
                f"{as_serving_error(error).message}. "
                "Please verify your warmup data is in TFRecord format.",
            ) from error
        except ServingError as error:
            raise ServingError(
                error.code, f"Warmup request {count} from {path} failed: {error.message}"
            ) from error
        return count

    def _replay(self, prediction_log: prediction_log_pb2.PredictionLog) -> None:
        kind = prediction_log.WhichOneof("log_type")
        if kind == "predict_log":
            self.predict(prediction_log.predict_log.request)
        elif kind == "classify_log":
            request = wire.reparse_request(prediction_log.classify_log.request)
            self.classify(request.model_spec, wire.serialized_examples(request.input))
        elif kind == "regress_log":
            request = wire.reparse_request(prediction_log.regress_log.request)
            self.regress(request.model_spec, wire.serialized_examples(request.input))
        else:
            raise ServingError(
                grpc.StatusCode.UNIMPLEMENTED, f"Unsupported log_type for warmup: {kind}"
            )


def _checked_matrix(
    tensor: tf.Tensor | None, dtype: tf.DType, name: str, num_examples: int
) -> np.ndarray | None:
    if tensor is None:
        return None
    if len(tensor.shape) != 2:
        raise invalid_argument(
            f"Expected Tensor shape: [batch_size num_classes] but got {list(tensor.shape)}"
        )
    if tensor.dtype != dtype:
        raise invalid_argument(
            f"Expected {name} Tensor of {_enum_name(dtype)}. Got: {_enum_name(tensor.dtype)}"
        )
    if tensor.shape[0] != num_examples:
        raise invalid_argument(
            f"Expected {name} output batch size of {num_examples}. Got: {tensor.shape[0]}"
        )
    return tensor.numpy()


def _enum_name(dtype: tf.DType) -> str:
    return types_pb2.DataType.Name(dtype.as_datatype_enum)


def _label(value: bytes) -> str:
    # Class.label is a proto3 string; TF Serving copies the bytes, Python needs valid UTF-8.
    return value.decode("utf-8", errors="replace")
