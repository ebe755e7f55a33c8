"""Raw tf.Examples built from plain values, typed as the model parses them.

One encoder for every place that builds a raw tf.Example from values: the scoring client's
requests, the warmup requests synthesised at export, the tools' offline scoring. Types come
from the model (its ``raw_features`` signature), else the config, else the values themselves.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from transform.config import Config, DType, Kind
from transform.errors import UsageError


class ExampleEncoder:
    """Builds tf.Examples of raw features, typed as the model parses them.

    ``types`` (column -> ``int64``, ``float`` or ``bytes``: the model's types, see
    :func:`kinds_of_inputs`) win; else the config's types (numbers of numeric features are
    floats, ids follow the feature's dtype); else the Python values' (str is bytes, int is
    int64, float is float). A whole float for an int64 column is sent as an int; a fraction is
    refused, naming the column.
    """

    def __init__(self, config: Config | None = None, types: Mapping[str, str] | None = None):
        self._kinds: dict[str, str] = {}
        if config is not None:
            for f in config.features:
                if f.kind is Kind.NUMERIC:
                    self._kinds[f.column] = "float"
                else:
                    self._kinds[f.column] = "bytes" if f.dtype is DType.STRING else "int64"
        self._kinds.update(types or {})

    def kind(self, name: str, values: list[Any]) -> str:
        """How a column's values are encoded: ``int64``, ``float`` or ``bytes``."""
        return self._kinds.get(name) or _kind_of(values)

    def feature(self, name: str, value: Any) -> tf.train.Feature:
        """One tf.train.Feature of a raw value or list of values."""
        values = list(value) if isinstance(value, list | tuple) else [value]
        kind = self.kind(name, values)
        try:
            if kind == "float":
                return tf.train.Feature(
                    float_list=tf.train.FloatList(value=[float(v) for v in values])
                )
            if kind == "int64":
                return tf.train.Feature(
                    int64_list=tf.train.Int64List(value=[as_int(v) for v in values])
                )
            return tf.train.Feature(
                bytes_list=tf.train.BytesList(
                    value=[v if isinstance(v, bytes) else str(v).encode() for v in values]
                )
            )
        except (TypeError, ValueError) as e:
            raise UsageError(f"feature {name!r}: cannot encode {value!r} as {kind}: {e}") from None

    def json_value(self, name: str, value: Any) -> Any:
        """A raw value (or list) as the JSON TF Serving's REST API turns into this feature.

        REST builds a tf.Example from JSON types: an integer is int64, a number with a decimal
        point float, a string bytes (``{"b64": ...}`` when it is not UTF-8 text).
        """
        values = list(value) if isinstance(value, list | tuple) else [value]
        kind = self.kind(name, values)
        try:
            if kind == "float":
                out: list[Any] = [float(v) for v in values]
            elif kind == "int64":
                out = [as_int(v) for v in values]
            else:
                out = [json_text(v if isinstance(v, bytes) else str(v).encode()) for v in values]
        except (TypeError, ValueError) as e:
            raise UsageError(f"feature {name!r}: cannot encode {value!r} as {kind}: {e}") from None
        return out if isinstance(value, list | tuple) else out[0]

    def json_features(self, features: Mapping[str, Any]) -> dict[str, Any]:
        """A mapping of raw values as a JSON example of TF Serving's REST classify API."""
        return {k: self.json_value(k, v) for k, v in features.items() if v is not None}

    def encode(self, features: Mapping[str, Any]) -> bytes:
        """A serialized tf.Example of a mapping of feature name to value(s)."""
        feats = {k: self.feature(k, v) for k, v in features.items() if v is not None}
        return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()

    def encode_query(
        self, query: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]
    ) -> list[bytes]:
        """One example per candidate: the query's features merged with the candidate's.

        The query's features are serialized once: a serialized `Features` is a list of map
        entries, so the query's entries followed by the candidate's, wrapped as the Example's
        field 1, are the merged Example. A candidate that repeats a query feature is merged
        feature by feature instead (its own value wins).
        """
        base = {k: self.feature(k, v) for k, v in query.items() if v is not None}
        base_bytes = tf.train.Features(feature=base).SerializeToString()
        out = []
        for candidate in candidates:
            own = {k: self.feature(k, v) for k, v in candidate.items() if v is not None}
            if own.keys() & base.keys():
                feats = dict(base)
                feats.update(own)
                body = tf.train.Features(feature=feats).SerializeToString()
            else:
                body = base_bytes + tf.train.Features(feature=own).SerializeToString()
            out.append(_EXAMPLE_FEATURES_TAG + _varint(len(body)) + body)
        return out


# Example.features is field 1, length-delimited: tag (1 << 3) | 2.
_EXAMPLE_FEATURES_TAG = b"\x0a"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def as_int(value: Any) -> int:
    """An int64 feature value; a float is accepted only when it is a whole number."""
    if isinstance(value, float | np.floating) and not (
        np.isfinite(value) and float(value).is_integer()
    ):
        raise UsageError(
            f"the model takes whole numbers (int64, as its log typed them), got {value!r}"
        )
    return int(value)


def json_text(value: bytes) -> Any:
    """Bytes as TF Serving's REST API takes them: UTF-8 text, else ``{"b64": ...}``."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(value).decode("ascii")}


def _kind_of(values: list[Any]) -> str:
    if values and all(isinstance(v, bool | int | np.integer) for v in values):
        return "int64"
    if values and all(isinstance(v, float | int | np.floating | np.integer) for v in values):
        return "float"
    return "bytes"
