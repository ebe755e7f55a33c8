"""Reading impression logs: Parquet, CSV or TFRecord of tf.Example, checked before Beam starts.

Every reader yields Arrow record batches in the layout tf.Transform's TFXIO adapter expects
(one ``large_list`` column per raw column), so all formats meet one ``preprocessing_fn``.
Files are opened through Beam's ``FileSystems``, so the same code reads local paths, ``gs://``
and the other filesystems Beam supports.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import glob
import io
import itertools
import json
import os
import re
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transform.config import Config, DType, Feature, Kind
from transform.errors import UsageError

# A split key hashes into this many slots; eval_fraction of them go to eval.
_SPLIT_SLOTS = 1_000_000
# How many records of each TFRecord file the pre-flight check decodes.
_TFRECORD_PROBE_RECORDS = 1000


class InputError(UsageError):
    """Input that cannot be read as the config describes; the message names file and column."""


class ColumnError(InputError):
    """A column the config reads is missing from the input (:class:`MissingColumnError`) or
    holds values of an unusable type (:class:`ColumnTypeError`); names it in ``column``."""

    def __init__(self, message: str, column: str):
        super().__init__(message)
        self.column = column

    def __reduce__(self) -> tuple[Any, ...]:  # an error raised on a Beam worker is pickled
        return type(self), (str(self), self.column)


class MissingColumnError(ColumnError):
    """A column the config reads is not in the input."""


class ColumnTypeError(ColumnError):
    """A column holds values of a type the config cannot read it as."""


class InputFormat(StrEnum):
    """The log formats data generation reads."""

    PARQUET = "parquet"
    CSV = "csv"
    TFRECORD = "tfrecord"


@dataclass(frozen=True)
class InputFiles:
    """The files one datagen run reads, all of one format."""

    format: InputFormat
    paths: tuple[str, ...]
    rows: int | None = None
    """Total rows when the format tells without reading the data (Parquet), else None."""
    split_column_dtype: str | None = None
    """Type (string, int, float) of a TFRecord's ``data.split_by`` column, found by preflight."""
    int_columns: tuple[str, ...] = ()
    """Columns the log holds as integers where the config would read another type (numbers of
    a numeric feature, string ids stored as integers), found by preflight: they keep the log's
    int64 type through data generation, so the model parses them as the log typed them."""
    float_label: bool = False
    """A TFRecord log's label is a float_list (0.0 and 1.0), found by preflight: it is decoded
    as float and made int64 once checked (:func:`fill_missing`)."""


def detect_format(path: str) -> InputFormat:
    """The format of a file from its name: .parquet, .csv[.gz], .tfrecord[.gz] or .gz."""
    name = path.lower()
    for suffix in (".gz", ".gzip", ".deflate", ".zlib"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith((".parquet", ".pq")):
        return InputFormat.PARQUET
    if name.endswith((".csv", ".tsv")):
        return InputFormat.CSV
    if name.endswith((".tfrecord", ".tfrecords", ".tfr")):
        return InputFormat.TFRECORD
    raise InputError(
        f"{path}: cannot tell the format from the file name; use .parquet, .csv or .tfrecord "
        "(optionally .gz), or pass --input_format"
    )


def resolve_input(patterns: str | Sequence[str], fmt: InputFormat | None = None) -> InputFiles:
    """Expands glob patterns (comma-separated or a list) into files of one format.

    Raises:
      InputError: a pattern matches nothing, the files mix formats, or all files are empty.
    """
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p]
    if not patterns:
        raise InputError("--input: no file pattern given")
    paths: list[str] = []
    for pattern in patterns:
        folder = _is_folder(pattern)
        glob_pattern = pattern
        if folder:
            # Every file below it; the folder's own name is taken literally ('[' included).
            glob_pattern = FileSystems.join(_literal(pattern.rstrip("/")), "**")
            pattern = FileSystems.join(pattern.rstrip("/"), "**")
        elif "://" not in pattern and os.path.isfile(pattern):
            glob_pattern = _literal(pattern)  # a file named as it is, '[' or '*' in its name
        try:
            with warnings.catch_warnings():
                # Beam's glob-to-regex translation warns of an escaped '[' as a nested set.
                warnings.simplefilter("ignore", FutureWarning)
                metadata = FileSystems.match([glob_pattern])[0].metadata_list
        except Exception as e:  # Beam raises BeamIOError with a nested cause
            raise InputError(f"--input {pattern}: {e}") from None
        found = sorted(m.path for m in metadata if not _is_hidden(m.path) and m.size_in_bytes > 0)
        if folder:
            # A folder may hold other files beside the log (a simulator's metadata, notes).
            found = [
                p
                for p in found
                if _known_format(p, fmt) and (fmt is not None or _has_data_suffix(p))
            ]
        if not found:
            raise InputError(f"--input {pattern}: {_why_nothing_found(pattern, metadata)}")
        paths.extend(found)
    if fmt is None:
        formats = {p: detect_format(p) for p in paths}
        kinds = set(formats.values())
        if len(kinds) > 1:
            examples = {k: next(p for p, f in formats.items() if f == k) for k in kinds}
            listing = ", ".join(f"{k.value} ({p})" for k, p in examples.items())
            raise InputError(f"--input: the files mix formats: {listing}")
        fmt = kinds.pop()
    return InputFiles(format=fmt, paths=tuple(dict.fromkeys(paths)))


def _literal(path: str) -> str:
    """A local path as a glob pattern that matches just that path."""
    return path if "://" in path else glob.escape(path)


def _why_nothing_found(pattern: str, metadata: Sequence[Any]) -> str:
    """Why a pattern gave no data file: a path that is not there reads better as such than as
    a glob that matched nothing."""
    wildcard = any(c in pattern for c in "*?[")
    if not wildcard and not metadata and "://" not in pattern:
        return "no such file or folder"
    if not wildcard and len(metadata) == 1:
        if _is_hidden(metadata[0].path):
            return "a marker file (its name starts with '_' or '.', or ends in .crc), not data"
        if metadata[0].size_in_bytes == 0:
            return "the file is empty"
    return "matches no non-empty data file"


def check_output_apart(
    patterns: str | Sequence[str], files: InputFiles, out_dir: str | os.PathLike[str]
) -> None:
    """Refuses an output folder inside the input, or an input inside the output folder.

    An output inside a folder (or ``**``) input would be read back as input by the next run;
    an input inside the output would be deleted when the output is replaced.

    Raises:
      InputError: naming both paths.
    """
    out = Path(out_dir).absolute()
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p]
    for path in files.paths:
        if "://" in path:
            continue
        file = Path(path).absolute()
        if out in file.parents:
            raise InputError(
                f"--input {path} is inside --out {out}: replacing the output would delete the "
                "input; write the output elsewhere"
            )
    for pattern in patterns:
        if "://" in pattern:
            continue
        folder = _is_folder(pattern)
        root = Path(pattern).absolute() if folder else _glob_root(pattern)
        recursive = folder or "**" in pattern
        if recursive and (out == root or root in out.parents):
            raise InputError(
                f"--out {out} is inside --input {pattern}: a later run would read the output "
                "as input; write the output elsewhere"
            )


def _glob_root(pattern: str) -> Path:
    """The folder a local glob pattern searches from (its part before any wildcard)."""
    parts = []
    for part in Path(pattern).parts:
        if any(c in part for c in "*?["):
            break
        parts.append(part)
    return Path(*parts).absolute() if parts else Path.cwd()


def _known_format(path: str, fmt: InputFormat | None) -> bool:
    try:
        return fmt is None or detect_format(path) is fmt
    except InputError:
        # With an explicit format, files without an extension are taken as that format.
        return fmt is not None and "." not in path.rsplit("/", 1)[-1]


def _has_data_suffix(path: str) -> bool:
    try:
        detect_format(path)
    except InputError:
        return False
    return True


def _is_folder(path: str) -> bool:
    if "://" in path:
        return path.endswith("/")
    return os.path.isdir(path)


def _is_hidden(path: str) -> bool:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    # Parquet writers leave _SUCCESS, _metadata and .crc files beside the data.
    return name.startswith(("_", ".")) or name.endswith(".crc")


# --------------------------------------------------------------------------------------------
# Target layout


def _target_type(feature: Feature, as_int: bool = False) -> pa.DataType:
    if as_int:
        return pa.int64()
    if feature.kind is Kind.NUMERIC:
        return pa.float32()
    return pa.large_binary() if feature.dtype is DType.STRING else pa.int64()


def _holds_integers(arrow_type: pa.DataType) -> bool:
    """Whether a column's values (a list's elements) are integers; booleans count as 0 and 1,
    as TF Serving's REST API sends a JSON true or false."""
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        arrow_type = arrow_type.value_type
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return pa.types.is_integer(arrow_type) or pa.types.is_boolean(arrow_type)


def _int_candidates(config: Config) -> list[str]:
    """Columns whose log type may be int64 while the config reads them otherwise."""
    from transform.features import can_be_int, raw_dtype

    out = []
    for column, feature in column_plan(config).items():
        if feature is None or not can_be_int(feature):
            continue
        if raw_dtype(feature).name != "int64":
            out.append(column)
    return out


def column_plan(config: Config) -> dict[str, Feature | None]:
    """Each raw column the pipeline reads and the feature that defines its type (None: label)."""
    plan: dict[str, Feature | None] = {config.label: None}
    for f in config.features:
        plan.setdefault(f.column, f)
    return plan


def _describe_expected(feature: Feature | None) -> str:
    if feature is None:
        return "a label of 0 and 1 (integers, booleans or floats)"
    if feature.kind is Kind.NUMERIC:
        return "numbers"
    item = "strings" if feature.dtype is DType.STRING else "integers"
    if feature.kind is Kind.CATEGORICAL_LIST:
        return f"lists of {item} (or strings of them joined by data.list_delimiter)"
    return item + (" or integers" if feature.dtype is DType.STRING else "")


_TIME_ADVICE = (
    " (a time is not read as a feature as it is: add the part the model should see as a "
    "column of its own, e.g. the hour or the day of the week as integers, or an age in days "
    "as a number, and name that column in the config)"
)
_TIME_TEXT = re.compile(r"\d{4}-\d{1,2}-\d{1,2}([ T]\d{1,2}:\d{2}.*)?$|\d{1,2}:\d{2}(:\d{2}.*)?$")
"""A date, a date and time, or a time of day written as text (ISO 8601 and the like)."""


def _time_advice(arrow_type: pa.DataType) -> str:
    """What to do with a time column, which no feature kind reads as it is: a number of
    seconds (or days) since the epoch would mean nothing the same way to the serving clients
    that must send it, and what a model can use of a time is a part of it."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if not (
        pa.types.is_timestamp(arrow_type)
        or pa.types.is_date(arrow_type)
        or pa.types.is_time(arrow_type)
        or pa.types.is_duration(arrow_type)
    ):
        return ""
    return _TIME_ADVICE


def _compatible(arrow_type: pa.DataType, feature: Feature | None) -> bool:
    """Whether a column of ``arrow_type`` can be read losslessly as ``feature`` wants."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if feature is None:
        # A label of 0.0 and 1.0 too, as pandas keeps one in a float column.
        return (
            pa.types.is_integer(arrow_type)
            or pa.types.is_boolean(arrow_type)
            or pa.types.is_floating(arrow_type)
        )
    if feature.kind is Kind.CATEGORICAL_LIST:
        if _is_text(arrow_type):
            return True  # values joined by data.list_delimiter, split as they are read
        if not (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)):
            return False
        arrow_type = arrow_type.value_type
    elif pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return False
    # A scalar boolean column (is_weekend, say) is read as the integers 0 and 1.
    integers = pa.types.is_integer(arrow_type) or (
        pa.types.is_boolean(arrow_type) and feature.kind is not Kind.CATEGORICAL_LIST
    )
    if feature.kind is Kind.NUMERIC:
        # Decimals (a warehouse's prices, say) are read as floats, like every number.
        return integers or pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type)
    if feature.dtype is DType.INT:
        return integers
    # String ids stored as integers are read as their decimal text.
    return _is_stringlike(arrow_type) or integers


def _is_text(t: pa.DataType) -> bool:
    """Whether a column (dictionary-encoded or not) holds UTF-8 strings."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_stringlike(t: pa.DataType) -> bool:
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
    )


def _missing_column_error(
    path: str, column: str, available: Sequence[str], what: str, why: str | None = None
) -> MissingColumnError:
    """The error for a column the input lacks: with ``why`` when known, else the closest name."""
    if why:
        hint = f"; {why}"
    else:
        close = difflib.get_close_matches(column, list(available), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
    return MissingColumnError(f"{path}: no column {column!r} ({what}){hint}", column)


def _what(column: str, config: Config) -> str:
    if column == config.label:
        return "the label"
    if column == config.data.split_by and column not in column_plan(config):
        return "data.split_by"
    users = [f.name for f in config.features if f.column == column]
    return "feature " + ", ".join(repr(u) for u in users)


def _missing_advice(column: str, config: Config) -> str:
    """What to do about missing values of a column: a feature may take a default, a label not."""
    if column == config.label:
        return (
            "a label has no default: drop the rows without one from the log, or fill their "
            "labels in"
        )
    return "give the feature a 'default' in the config or clean the log"


def _required_columns(config: Config) -> list[str]:
    cols = list(column_plan(config))
    if config.data.split_by and config.data.split_by not in cols:
        cols.append(config.data.split_by)
    return cols


# --------------------------------------------------------------------------------------------
# Pre-flight: checks every file's schema (and what else is cheap) before the Beam job starts.


def preflight(config: Config, files: InputFiles) -> InputFiles:
    """Checks that every input file has the config's columns with usable types.

    Parquet files are checked from their footers (columns, types, null counts, row counts);
    CSV files from their header and first block; TFRecord files by decoding their first
    records. Returns ``files`` with the row count filled in where known.

    Raises:
      InputError: naming the file and the column (or the file, if it is corrupt or empty).
    """
    if files.format is InputFormat.PARQUET:
        rows = 0
        int_columns = _int_candidates(config)
        for path in files.paths:
            count, schema = _preflight_parquet(config, path)
            rows += count
            # A column is the log's int64 only when every file holds integers in it.
            int_columns = [c for c in int_columns if _holds_integers(schema.field(c).type)]
        if rows == 0:
            raise InputError(f"--input: the {len(files.paths)} Parquet file(s) hold no rows")
        return InputFiles(files.format, files.paths, rows, int_columns=tuple(int_columns))
    split_dtypes = set()
    int_columns = _int_candidates(config) if files.format is InputFormat.CSV else []
    float_label = False
    found = _TFRecordKinds()
    for path in files.paths:
        if files.format is InputFormat.CSV:
            int_columns = _csv_whole_number_columns(config, path, int_columns)
            _preflight_csv(config, path, int_columns)
        else:
            found.split_dtype = None
            _preflight_tfrecord(config, path, found)
            split_dtypes.add(found.split_dtype)
    if files.format is InputFormat.TFRECORD:
        int_columns, float_label = _tfrecord_types(config, found)
    split_dtypes.discard(None)
    if len(split_dtypes) > 1:
        raise InputError(
            f"--input: the split column {config.data.split_by!r} has different "
            f"types in different files: {', '.join(sorted(split_dtypes))}"
        )
    return InputFiles(
        files.format,
        files.paths,
        None,
        split_dtypes.pop() if split_dtypes else None,
        int_columns=tuple(int_columns),
        float_label=float_label,
    )


def _preflight_parquet(config: Config, path: str) -> tuple[int, pa.Schema]:
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
    except Exception as e:
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    plan = column_plan(config)
    for column in _required_columns(config):
        if column not in schema.names:
            raise _missing_column_error(path, column, schema.names, _what(column, config))
        feature = plan.get(column)
        if column in plan and not _compatible(schema.field(column).type, feature):
            raise ColumnTypeError(
                f"{path}: column {column!r} ({_what(column, config)}) holds "
                f"{schema.field(column).type}, expected {_describe_expected(feature)}"
                f"{_time_advice(schema.field(column).type)}",
                column,
            )
    # Null counts are in the footer's statistics: a missing value is found without reading.
    for column, feature in plan.items():
        if feature is not None and (
            feature.default is not None or feature.kind is Kind.CATEGORICAL_LIST
        ):
            continue  # filled in with the default, or an empty list
        nulls = _parquet_null_count(meta, column)
        if nulls:
            raise InputError(
                f"{path}: column {column!r} ({_what(column, config)}) has {nulls} missing "
                f"value(s); {_missing_advice(column, config)}"
            )
    # So are the label's smallest and largest values: a rating or a count is found at once.
    label_type = schema.field(config.label).type
    if pa.types.is_integer(label_type) or pa.types.is_floating(label_type):
        low, high = _parquet_min_max(meta, config.label)
        if (low is not None and low < 0) or (high is not None and high > 1):
            held = f"only {low}" if low == high else f"values from {low} to {high}"
            raise InputError(f"{path}: label column {config.label!r} holds {held}; {LABEL_VALUES}")
    return meta.num_rows, schema


LABEL_VALUES = (
    "labels must be 0 or 1 (make a rating or a count a 0/1 column of the log, e.g. 1 where "
    "rating >= 4)"
)
"""What a label must be, said wherever one is refused."""


def _parquet_statistics(meta: pq.FileMetaData, column: str) -> list[Any]:
    """The footer's statistics of ``column`` in each row group that has them."""
    index = [meta.schema.column(i).path.split(".")[0] for i in range(meta.num_columns)]
    found = []
    for rg in range(meta.num_row_groups):
        for i, name in enumerate(index):
            if name != column:
                continue
            stats = meta.row_group(rg).column(i).statistics
            if stats is not None:
                found.append(stats)
    return found


def _parquet_null_count(meta: pq.FileMetaData, column: str) -> int:
    return sum(s.null_count for s in _parquet_statistics(meta, column) if s.has_null_count)


def _parquet_min_max(meta: pq.FileMetaData, column: str) -> tuple[Any, Any]:
    """The smallest and largest value of ``column`` the footer records (None: not recorded)."""
    stats = [s for s in _parquet_statistics(meta, column) if s.has_min_max]
    if not stats:
        return None, None
    return min(s.min for s in stats), max(s.max for s in stats)


def _preflight_csv(config: Config, path: str, int_columns: Sequence[str]) -> None:
    try:
        batches = iter_csv(config, path, block_rows=1000, int_columns=int_columns)
        next(batches, None)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: not a readable CSV file ({e})") from None


_UTF8_BOM = b"\xef\xbb\xbf"


def _csv_head(raw: Any, delimiter: str) -> tuple[bytes, list[str]]:
    """The first 64 KiB of a CSV file without a UTF-8 byte order mark, and its header's
    column names.

    Spreadsheet programs and many Windows tools start a UTF-8 CSV file with a byte order mark;
    left in, it would be part of the first column's name.
    """
    head = raw.read(1 << 16).removeprefix(_UTF8_BOM)
    # Names as the CSV reader sees them: a space after a delimiter stays part of the name.
    header = head.split(b"\n", 1)[0].decode("utf-8", "replace").strip("\r")
    return head, [n.strip('"') for n in header.split(delimiter)]


def _header_hint(names: Sequence[str], delimiter: str, column: str) -> str | None:
    """Why a CSV header may lack ``column``, when its names say: a header of one column written
    with another delimiter (a .tsv file read with commas), or spaces around the delimiters,
    which CSV keeps as part of the names and values."""
    if len(names) == 1:
        for other in ("\t", ";", "|", ","):
            if other != delimiter and other in names[0]:
                return (
                    f"the header reads as one column, its fields look separated by "
                    f"{json.dumps(other)}, not {json.dumps(delimiter)}: set "
                    f"data.csv_delimiter: {json.dumps(other)} in the config"
                )
    if column in (n.strip() for n in names):
        return (
            "the header has spaces around its delimiters, and CSV keeps them as part of the "
            "names and the values: write the file without them"
        )
    return None


# What pyarrow's CSV reader reads as int64: an optional sign and at most 18 digits.
_CSV_INTEGER = r"^[+-]?[0-9]{1,18}$"
# A CSV label's values: pyarrow's boolean texts, and a float column's 1.0 and 0.0.
_CSV_TRUE = ["1", "True", "TRUE", "true", "1.0"]
_CSV_FALSE = ["0", "False", "FALSE", "false", "0.0"]
# What it reads as a boolean: read as 1 and 0, as a Parquet log's boolean column is.
_CSV_BOOLEAN = r"^(true|false|True|False|TRUE|FALSE)$"


def _csv_whole_number_columns(config: Config, path: str, candidates: Sequence[str]) -> list[str]:
    """Those of ``candidates`` whose every value in the file is an integer (or a boolean).

    CSV has no types: a column is typed as pyarrow's CSV reader would type it, int64 when every
    field is written as an integer ("34", not "34.0"), so that examples built from the file's
    rows as pyarrow reads them parse. A column of true/false is a boolean one, read as 1 and 0
    as a Parquet log's boolean column is: a numeric feature's (true/false mixed with integers
    too) and a string id's, whose tokens are then "1" and "0" and whose requests may send a
    JSON true. The whole column is read: a decimal far down the file makes it a float column.
    Other columns (string ids of integers among them) keep the config's type.
    """
    plan = column_plan(config)
    patterns = {}
    for c in candidates:
        feature = plan[c]
        if feature is None:
            continue
        if feature.kind is Kind.NUMERIC:
            patterns[c] = f"{_CSV_INTEGER}|{_CSV_BOOLEAN}"
        elif feature.kind is Kind.CATEGORICAL and feature.dtype is DType.STRING:
            patterns[c] = _CSV_BOOLEAN
    left = list(patterns)
    if not left:
        return []
    names: list[str] = []
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as raw:
            head, names = _csv_head(raw, config.data.csv_delimiter)
            # A column the file lacks is reported by the header check that follows.
            left = [c for c in left if c in names]
            if not left:
                return []
            reader = pacsv.open_csv(
                _Prepended(head, raw),
                read_options=pacsv.ReadOptions(block_size=1 << 20),
                parse_options=pacsv.ParseOptions(delimiter=config.data.csv_delimiter),
                convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in left},
                    include_columns=left,
                    strings_can_be_null=True,
                ),
            )
            for batch in reader:
                left = [
                    c
                    for c in left
                    if pc.all(
                        pc.match_substring_regex(batch.column(c).drop_null(), patterns[c])
                    ).as_py()
                    is not False
                ]
                if not left:
                    break
    except pa.ArrowInvalid as e:
        raise InputError(f"{path}: {_explain_csv_error(str(e), path, names, config)}") from None
    return left


@dataclass
class _TFRecordKinds:
    """What the first records of a TFRecord log hold: the split column's type, and for each
    column the config reads, the kinds (``int64_list``, ...) seen and the first record of each."""

    split_dtype: str | None = None
    kinds: dict[str, dict[str, str]] = field(default_factory=dict)

    def note(self, column: str, kind: str, where: str) -> None:
        self.kinds.setdefault(column, {}).setdefault(kind, where)


def _preflight_tfrecord(config: Config, path: str, found: _TFRecordKinds) -> None:
    """Checks a TFRecord file's first records; notes their split column's type and kinds."""
    import tensorflow as tf  # TF is only needed for this format

    plan = column_plan(config)
    compression = "GZIP" if path.endswith((".gz", ".gzip")) else ""
    seen = 0
    split_by = config.data.split_by
    try:
        dataset = tf.data.TFRecordDataset(path, compression_type=compression)
        for record in dataset.take(_TFRECORD_PROBE_RECORDS):
            seen += 1
            example = tf.train.Example.FromString(record.numpy())
            feats = example.features.feature
            for column in _required_columns(config):
                if column not in feats:
                    if (
                        column in plan
                        and plan[column] is not None
                        and (
                            plan[column].default is not None
                            or plan[column].kind is Kind.CATEGORICAL_LIST
                        )
                    ):
                        continue
                    raise _missing_column_error(
                        f"{path} (record {seen})", column, list(feats), _what(column, config)
                    )
                if column not in plan:
                    kind = feats[column].WhichOneof("kind")
                    if column == split_by and kind is not None:
                        found.split_dtype = {"int64_list": "int", "float_list": "float"}.get(
                            kind, "string"
                        )
                    continue
                kind = feats[column].WhichOneof("kind")
                want = _example_kind(plan[column], column == config.label)
                if kind is not None and kind not in want:
                    raise ColumnTypeError(
                        f"{path} (record {seen}): feature {column!r} "
                        f"({_what(column, config)}) is a {kind}, expected {' or '.join(want)}",
                        column,
                    )
                if kind is not None:
                    found.note(column, kind, f"{path} (record {seen})")
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: not a readable TFRecord file of tf.Example ({e})") from None
    if seen == 0:
        raise InputError(f"{path}: holds no records")


def _tfrecord_types(config: Config, found: _TFRecordKinds) -> tuple[list[str], bool]:
    """The columns the TFRecord log holds as int64_list where the config reads another type,
    and whether its label is a float_list.

    tf.Example parsing takes one type per column, so a column must hold one kind throughout.

    Raises:
      ColumnTypeError: a column holds two kinds, naming a record of each.
    """
    for column, kinds in found.kinds.items():
        if len(kinds) > 1:
            (a, where_a), (b, where_b) = list(kinds.items())[:2]
            raise ColumnTypeError(
                f"column {column!r} ({_what(column, config)}) holds {a} values in {where_a} "
                f"and {b} values in {where_b}; tf.Example parsing takes one type per column: write it as "
                "one type in every record",
                column,
            )
    int_columns = [
        c for c in _int_candidates(config) if set(found.kinds.get(c, ())) == {"int64_list"}
    ]
    float_label = set(found.kinds.get(config.label, ())) == {"float_list"}
    return int_columns, float_label


def tfrecord_types(config: Config, path: str) -> tuple[list[str], bool]:
    """The columns a TFRecord file holds as int64_list where the config reads another type,
    and whether its label is a float_list, from its first records (see :func:`preflight`)."""
    found = _TFRecordKinds()
    _preflight_tfrecord(config, path, found)
    return _tfrecord_types(config, found)


def _example_kind(feature: Feature | None, is_label: bool = False) -> tuple[str, ...]:
    """The kinds a tf.Example log may hold a column as: the config's type, or the integers it
    reads too (numbers of a numeric feature, string ids stored as integers; a label of 0.0 and
    1.0 as floats)."""
    from transform.features import can_be_int

    if feature is None:
        return ("int64_list", "float_list") if is_label else ("int64_list",)
    int_too = ("int64_list",) if can_be_int(feature) else ()
    if feature.kind is Kind.NUMERIC:
        return ("float_list", *int_too)
    return ("bytes_list", *int_too) if feature.dtype is DType.STRING else ("int64_list",)


# --------------------------------------------------------------------------------------------
# Reading batches


def iter_parquet(
    config: Config, path: str, batch_rows: int, columns: Sequence[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Yields raw batches of at most ``batch_rows`` rows, reading one row group at a time.

    ``columns``: only these of the columns the config reads (default: all of them).
    """
    columns = list(columns) if columns is not None else _required_columns(config)
    plan = column_plan(config)
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        try:
            reader = pq.ParquetFile(f)
            for batch in reader.iter_batches(batch_size=batch_rows, columns=columns):
                yield _split_text_lists(batch, plan, config.data.list_delimiter)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"{path}: failed to read Parquet ({e})") from None


def iter_csv(
    config: Config,
    path: str,
    block_rows: int = 65_536,
    int_columns: Sequence[str] = (),
    columns: Sequence[str] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Yields raw batches of a CSV file with a header row; list fields are split.

    ``int_columns`` (numeric columns found to hold only integers) are read as int64.
    ``columns``: only these of the columns the config reads (default: all of them).
    """
    plan = column_plan(config)
    delimiter = config.data.csv_delimiter
    columns = list(columns) if columns is not None else _required_columns(config)
    compression = CompressionTypes.AUTO
    with FileSystems.open(path, compression_type=compression) as raw:
        stream = raw
        head, names = _csv_head(stream, delimiter)
        for column in columns:
            if column not in names:
                why = _header_hint(names, delimiter, column)
                raise _missing_column_error(path, column, names, _what(column, config), why)
        column_types = {}
        for column in columns:
            feature = plan.get(column)
            if feature is None and column == config.label:
                # 0/1 or false/true (False/True as pandas writes a bool column, FALSE/TRUE, and
                # 0.0/1.0 a float one); read as int64 by _split_lists, as a Parquet log's
                # integer, boolean or float label is.
                column_types[column] = pa.bool_()
            elif feature is None or feature.kind is Kind.CATEGORICAL_LIST:
                column_types[column] = pa.string()
            elif column in int_columns:
                # Text, made int64 by _split_lists: the column may hold true and false.
                column_types[column] = pa.string()
            elif feature.kind is Kind.NUMERIC:
                column_types[column] = pa.float64()
            else:
                column_types[column] = pa.int64() if feature.dtype is DType.INT else pa.string()
        body = _Prepended(head, stream)
        try:
            reader = pacsv.open_csv(
                body,
                read_options=pacsv.ReadOptions(block_size=max(1 << 20, block_rows * 128)),
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=pacsv.ConvertOptions(
                    column_types=column_types,
                    include_columns=columns,
                    strings_can_be_null=True,
                    quoted_strings_can_be_null=False,
                    true_values=_CSV_TRUE,
                    false_values=_CSV_FALSE,
                ),
            )
            for batch in reader:
                yield _split_lists(batch, plan, config.data.list_delimiter, int_columns)
        except pa.ArrowInvalid as e:
            raise InputError(f"{path}: {_explain_csv_error(str(e), path, names, config)}") from None


_CSV_COLUMN = re.compile(r"In CSV column #(\d+): (.*)", re.DOTALL)
_CSV_VALUE = re.compile(r"invalid value '(.*)'$", re.DOTALL)
_CSV_FIELDS = re.compile(r"Expected (\d+) columns, got (\d+)")


def _explain_csv_error(message: str, path: str, names: Sequence[str], config: Config) -> str:
    """pyarrow's CSV error, with the column's name and the line where the problem is.

    pyarrow names a column by number and no line ("In CSV column #3: CSV conversion error to
    double: invalid value 'x'"), and reports a quote that is never closed as a row with too few
    columns. The file is read again, with Python's csv module, to find the line.
    """
    delimiter = config.data.csv_delimiter
    column_error = _CSV_COLUMN.match(message)
    if column_error:
        index, detail = int(column_error.group(1)), column_error.group(2)
        column = names[index] if index < len(names) else f"#{index}"
        what = f" ({_what(column, config)})" if column in column_plan(config) else ""
        value = _CSV_VALUE.search(detail)
        if column == config.label:
            detail += "; a label is 0 or 1 (or false or true)"
        elif value and _TIME_TEXT.match(value.group(1)):
            detail += _TIME_ADVICE
        line = None
        if value:
            with contextlib.suppress(_CsvUnreadable):
                line = _find_csv_line(
                    path, delimiter, lambda row: _field(row, index) == value.group(1)
                )
        where = f"line {line}, " if line else ""
        return f"{where}column {column!r}{what}: {detail}"
    fields = _CSV_FIELDS.search(message)
    if fields:
        expected = int(fields.group(1))
        try:
            line = _find_csv_line(path, delimiter, lambda row: len(row) != expected)
        except _CsvUnreadable as unreadable:
            if "unexpected end of data" in unreadable.reason:
                return (
                    f"line {unreadable.line}: a quoted field opened on this line is never "
                    "closed (an unterminated '\"'), so the rest of the file was read as part of "
                    f"it; {message.splitlines()[0]}"
                )
            return f"line {unreadable.line}: {unreadable.reason}; {message.splitlines()[0]}"
        if line:
            first = message.splitlines()[0]
            return f"line {line}: expected {expected} fields, as in the header; {first}"
    return message


class _CsvUnreadable(Exception):
    """Python's csv module could not read a record; `line` is where the record starts."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


def _field(row: list[str], index: int) -> str | None:
    return row[index] if index < len(row) else None


def _csv_rows(path: str, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """The file's records (header included) with the line each starts on, 1-based.

    Raises:
      _CsvUnreadable: at a record the csv module cannot read (a quote left open, say).
    """
    with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as raw:
        # utf-8-sig: a byte order mark is not part of the first field.
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
        reader = csv.reader(text, delimiter=delimiter, strict=True)
        start = 1
        try:
            for row in reader:
                yield start, row
                start = reader.line_num + 1
        except csv.Error as error:
            raise _CsvUnreadable(start, str(error)) from None


def _find_csv_line(path: str, delimiter: str, match: Callable[[list[str]], bool]) -> int | None:
    """The line of the first record after the header that `match`es; None if there is none
    or the file cannot be read again. Raises `_CsvUnreadable` at a record it cannot read."""
    try:
        for line, row in itertools.islice(_csv_rows(path, delimiter), 1, None):
            if match(row):
                return line
    except (OSError, ValueError):
        return None
    return None


class _Prepended(io.RawIOBase):
    """A stream that replays bytes already read before the rest of another stream."""

    def __init__(self, head: bytes, rest: io.IOBase):
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _split_lists(
    batch: pa.RecordBatch,
    plan: dict[str, Feature | None],
    delimiter: str,
    int_columns: Collection[str] = (),
) -> pa.RecordBatch:
    """A CSV batch as the other formats give it: lists split, the label and the columns of
    integers (or booleans) in ``int_columns`` as int64."""
    arrays = []
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        feature = plan.get(name)
        if feature is not None and feature.kind is Kind.CATEGORICAL_LIST:
            column = _split_delimited(column, delimiter)
        elif name in plan and feature is None:  # the label
            column = column.cast(pa.int64())
        elif name in int_columns:
            column = _csv_integers(column)
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)


def _csv_integers(column: pa.Array) -> pa.Array:
    """CSV text of integers, or of true and false (1 and 0), as int64.

    Written by hand because Arrow's cast takes neither a boolean's text nor the leading "+"
    that its CSV reader accepts in an integer.
    """
    lower = pc.utf8_lower(column)
    column = pc.if_else(
        pc.equal(lower, "true"), "1", pc.if_else(pc.equal(lower, "false"), "0", column)
    )
    return pc.replace_substring_regex(column, r"^\+", "").cast(pa.int64())


def _split_text_lists(
    batch: pa.RecordBatch, plan: dict[str, Feature | None], delimiter: str
) -> pa.RecordBatch:
    """A Parquet batch whose list features stored as delimited strings are split into lists.

    Warehouses often export a list as one string ("Action|Comedy"), as a CSV log holds it; a
    column already of lists is left as it is.
    """
    arrays = list(batch.columns)
    for i, name in enumerate(batch.schema.names):
        feature = plan.get(name)
        if (
            feature is not None
            and feature.kind is Kind.CATEGORICAL_LIST
            and _is_text(arrays[i].type)
        ):
            arrays[i] = _split_delimited(arrays[i], delimiter)
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)


def _split_delimited(column: pa.Array, delimiter: str) -> pa.Array:
    """A string column of values joined by ``delimiter`` as a list column.

    An empty string is an empty list, not a list holding ""; a missing value stays missing.
    """
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    column = column.cast(pa.string())
    column = pc.if_else(pc.equal(column, ""), pa.scalar(None, pa.string()), column)
    return pc.split_pattern(column, delimiter)


# --------------------------------------------------------------------------------------------
# Normalising a raw batch into the TFXIO layout


def to_tfxio_batch(
    config: Config,
    batch: pa.RecordBatch,
    path: str,
    int_columns: Sequence[str] = (),
    columns: Sequence[str] | None = None,
) -> pa.RecordBatch:
    """Converts a raw batch (any supported Arrow types) to the ``large_list`` layout.

    Values take the type the config gives their column, except ``int_columns`` (see
    `InputFiles.int_columns`), which stay int64. ``columns``: only these (default: every
    column the config reads).

    Missing values take the feature's ``default``; a missing list is an empty list; any other
    missing value raises an :class:`InputError` naming the file and column. A ``split_by``
    column that no feature reads is kept (for :func:`split_mask`) and dropped after the split.
    """
    arrays = []
    names = []
    plan = column_plan(config)
    for column in columns if columns is not None else _required_columns(config):
        arr = batch.column(batch.schema.get_field_index(column))
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        if column in plan:
            as_int = column in int_columns
            arrays.append(_to_large_list(arr, plan[column], column, path, config, as_int))
        else:
            arrays.append(_wrap_scalar(_as_binary(arr)))
        names.append(column)
    return pa.RecordBatch.from_arrays(arrays, names=names)


def split_joined_lists(config: Config, batch: pa.RecordBatch) -> pa.RecordBatch:
    """Decoded tf.Examples (TFXIO layout) whose string lists may hold joined values ("a|b",
    as a CSV log holds a list), split on ``data.list_delimiter`` as the CSV reader and the
    served model split them; empty pieces are dropped (a value that is empty itself is kept).
    A batch without any is returned as is.
    """
    delimiter = config.data.list_delimiter
    lists = {f.column for f in config.features if f.kind is Kind.CATEGORICAL_LIST}
    arrays = list(batch.columns)
    for i, name in enumerate(batch.schema.names):
        arr = arrays[i]
        if name not in lists or not _is_stringlike(arr.type.value_type):
            continue
        values = pc.list_flatten(arr)
        if not pc.any(pc.match_substring(values, delimiter)).as_py():
            continue
        parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
        pieces = pc.split_pattern(values, delimiter)
        owner = pc.list_parent_indices(pieces).to_numpy(zero_copy_only=False)
        rows = parents[owner]
        flat = pc.list_flatten(pieces)
        # Empty pieces are dropped; a value that is empty itself is kept, as the model does.
        empty_value = (pc.binary_length(values).to_numpy(zero_copy_only=False) == 0)[owner]
        keep = (pc.binary_length(flat).to_numpy(zero_copy_only=False) > 0) | empty_value
        offsets = np.concatenate([[0], np.cumsum(np.bincount(rows[keep], minlength=len(arr)))])
        kind = pa.LargeListArray if pa.types.is_large_list(arr.type) else pa.ListArray
        tokens = flat.filter(pa.array(keep)).cast(arr.type.value_type)
        arrays[i] = kind.from_arrays(offsets, tokens)
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)


def fill_missing(config: Config, batch: pa.RecordBatch, where: str) -> pa.RecordBatch:
    """Fills scalar values missing from decoded tf.Examples with their feature's ``default``.

    Raises:
      InputError: a value is missing (or a scalar column has several values) and the feature
        has no default, or a label is not 0 or 1.
    """
    plan = column_plan(config)
    arrays = list(batch.columns)
    for i, name in enumerate(batch.schema.names):
        if name not in plan or (
            plan[name] is not None and plan[name].kind is Kind.CATEGORICAL_LIST
        ):
            continue
        arr = arrays[i]
        lengths = pc.list_value_length(arr).fill_null(0).to_numpy()
        if (lengths == 1).all():
            continue
        feature = plan[name]
        default = feature.default if feature is not None else None
        bad = int((lengths != 1).sum())
        if default is None or (lengths > 1).any():
            problem = "missing" if (lengths <= 1).all() else "missing or repeated"
            advice = _missing_advice(name, config)
            if (lengths > 1).any():
                advice = "it takes one value per record; clean the log"
            raise InputError(
                f"{where}: feature {name!r} ({_what(name, config)}) is {problem} in {bad} "
                f"record(s); {advice}"
            )
        rows = [v if v else [default] for v in arr.to_pylist()]
        arrays[i] = pa.array(rows, arr.type)
    label = batch.schema.get_field_index(config.label)
    names = batch.schema.names
    if label >= 0:  # checked as the other formats' labels are (and a float_list made int64)
        arr = arrays[label]
        values = labels_of(pc.list_flatten(arr), f"{where}: label {config.label!r}", config)
        if values.type != arr.type.value_type:
            kind = pa.LargeListArray if pa.types.is_large_list(arr.type) else pa.ListArray
            arrays[label] = kind.from_arrays(pc.subtract(arr.offsets, arr.offsets[0]), values)
    return pa.RecordBatch.from_arrays(arrays, names=names)


def drop_split_column(config: Config, batch: pa.RecordBatch) -> pa.RecordBatch:
    """Drops the ``split_by`` column if no feature reads it."""
    split_by = config.data.split_by
    if split_by and split_by not in column_plan(config) and split_by in batch.schema.names:
        return batch.drop_columns([split_by])
    return batch


def _wrap_scalar(values: pa.Array) -> pa.Array:
    offsets = pa.array(np.arange(len(values) + 1, dtype=np.int64))
    return pa.LargeListArray.from_arrays(offsets, values)


def _as_binary(values: pa.Array) -> pa.Array:
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return values.cast(pa.large_string()).view(pa.large_binary())
    return values


def _to_large_list(
    arr: pa.Array,
    feature: Feature | None,
    column: str,
    path: str,
    config: Config,
    as_int: bool = False,
) -> pa.Array:
    if feature is not None and feature.kind is Kind.CATEGORICAL_LIST:
        if arr.null_count:
            arr = pc.if_else(pc.is_null(arr), pa.scalar([], arr.type), arr)
        values = arr.flatten()
        if values.null_count:
            raise InputError(
                f"{path}: column {column!r} ({_what(column, config)}) has a list "
                "with a missing element"
            )
        offsets = pc.subtract(arr.offsets, arr.offsets[0]).cast(pa.int64())
        return pa.LargeListArray.from_arrays(
            offsets, _cast_values(values, feature, column, path, as_int)
        )
    if arr.null_count:
        default = feature.default if feature is not None else None
        if default is None:
            raise InputError(
                f"{path}: column {column!r} ({_what(column, config)}) has {arr.null_count} "
                f"missing value(s); {_missing_advice(column, config)}"
            )
        arr = arr.fill_null(
            pa.scalar(default).cast(arr.type)
            if not pa.types.is_null(arr.type)
            else pa.scalar(default)
        )
    if feature is None:  # the label
        values = labels_of(arr, f"{path}: label column {column!r}", config)
    else:
        values = _cast_values(arr, feature, column, path, as_int)
    return _wrap_scalar(values)


def labels_of(arr: pa.Array, where: str, config: Config) -> pa.Array:
    """A label column (integers, booleans or floats, none missing) as int64 0 and 1.

    Raises:
      InputError: naming ``where``, for a NaN (a float label's missing value) or a value that
        is not 0 or 1.
    """
    if pa.types.is_floating(arr.type):
        nan = pc.is_nan(arr)
        if pc.any(nan).as_py():
            raise InputError(
                f"{where} has {pc.sum(nan).as_py()} missing value(s) (NaN); "
                f"{_missing_advice(config.label, config)}"
            )
    ok = pc.or_(pc.equal(arr, 0), pc.equal(arr, 1)) if not pa.types.is_boolean(arr.type) else None
    if ok is not None and not pc.all(ok).as_py():
        bad = pc.filter(arr, pc.invert(ok))[0]
        raise InputError(f"{where} holds {bad}; {LABEL_VALUES}")
    return arr.cast(pa.int64())


def _cast_values(
    values: pa.Array, feature: Feature, column: str, path: str, as_int: bool = False
) -> pa.Array:
    target = _target_type(feature, as_int)
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    try:
        if pa.types.is_boolean(values.type):
            values = values.cast(pa.int64())  # 0 and 1: "1" as a string id, 1.0 as a number
        if pa.types.is_decimal(values.type):
            # Through float64: Arrow's decimal-to-float32 cast can miss the nearest float32
            # (0.54 became 0.53999996), and a decimal must read as the float log of it would.
            values = values.cast(pa.float64())
        if target == pa.large_binary() and pa.types.is_integer(values.type):
            values = pc.cast(values, pa.string())
        return _as_binary(values).cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise InputError(
            f"{path}: column {column!r} ({feature.kind.value}) cannot be read as {target}: {e}"
        ) from None


# --------------------------------------------------------------------------------------------
# The deterministic train/eval split


def split_mask(config: Config, batch: pa.RecordBatch, salt: str = "") -> np.ndarray:
    """True for the rows of a batch (in the ``large_list`` layout) that belong to the eval split.

    The split depends only on row content: the ``data.split_by`` column's value when set (so
    all impressions of one query or user fall on one side), else every feature column of the
    row. Re-running on the same log, in any format and on any runner, gives the same split.
    The label never takes part: rows with the same features would otherwise be split by their
    label, and a model would learn the opposite of the truth from a log with repeated rows.

    A ``salt`` (the daily loop's day) draws another split of the same keys: split by user, the
    same users would otherwise be held out of training every day, and never learned.
    """
    plan = column_plan(config)
    if config.data.split_by:
        column = batch.column(batch.schema.get_field_index(config.data.split_by))
        key = _hash_list_column(_as_config_type(column, plan.get(config.data.split_by)))
    else:
        key = np.zeros(batch.num_rows, dtype=np.uint64)
        for i, (name, arr) in enumerate(zip(batch.schema.names, batch.columns, strict=True)):
            if name != config.label:
                arr = _as_config_type(arr, plan.get(name))
                key = key * np.uint64(1_000_003) + _hash_list_column(arr) + np.uint64(i)
    if salt:
        salted = key ^ pd.util.hash_array(np.array([salt], dtype=object), categorize=False)[0]
        key = pd.util.hash_array(salted, categorize=False)
    slot = key % np.uint64(_SPLIT_SLOTS)
    return slot < np.uint64(round(config.data.eval_fraction * _SPLIT_SLOTS))


def _as_config_type(arr: pa.Array, feature: Feature | None) -> pa.Array:
    """A ``large_list`` column with the values typed as the config types them.

    A column kept as the log's int64 (`InputFiles.int_columns`) is hashed as the config's type,
    so a row lands on the same side of the split whatever type its log gave the column.
    """
    if feature is None or arr.type.value_type == _target_type(feature):
        return arr
    values = arr.flatten()
    if _target_type(feature) == pa.large_binary():
        values = _as_binary(pc.cast(values, pa.string())).cast(pa.large_binary())
    else:
        values = values.cast(_target_type(feature))
    offsets = pc.subtract(arr.offsets, arr.offsets[0])
    return pa.LargeListArray.from_arrays(offsets, values)


def _hash_list_column(arr: pa.Array) -> np.ndarray:
    """One hash a row of a ``large_list`` column: its elements' hashes summed, and its length."""
    n = len(arr)
    offsets = pc.subtract(arr.offsets, arr.offsets[0]).to_numpy()
    values = arr.flatten().to_numpy(zero_copy_only=False)
    # pandas' hash is a keyed SipHash with a fixed key: stable across runs and machines.
    element = pd.util.hash_array(values, categorize=False) if len(values) else values
    lengths = np.diff(offsets).astype(np.uint64)
    sums = np.zeros(n, dtype=np.uint64)
    nonempty = lengths > 0
    if nonempty.any():
        with np.errstate(over="ignore"):
            sums[nonempty] = np.add.reduceat(element.astype(np.uint64), offsets[:-1][nonempty])
    with np.errstate(over="ignore"):
        return sums * np.uint64(31) + lengths


# --------------------------------------------------------------------------------------------
# A few raw rows, as Python values (example queries, previews)


def read_rows(config: Config, files: InputFiles, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` rows of the input: each a dict of the columns the config reads.

    List features are lists; a value missing from a tf.Example is left out of its row.
    """
    rows: list[dict[str, Any]] = []
    for path in files.paths:
        if len(rows) >= limit:
            break
        need = limit - len(rows)
        if files.format is InputFormat.TFRECORD:
            rows.extend(_tfrecord_rows(config, path, need))
            continue
        batches = (
            iter_parquet(config, path, need)
            if files.format is InputFormat.PARQUET
            else iter_csv(config, path, int_columns=files.int_columns)
        )
        for batch in batches:
            rows.extend(batch.slice(0, limit - len(rows)).to_pylist())
            if len(rows) >= limit:
                break
    return rows


def _tfrecord_rows(config: Config, path: str, limit: int) -> list[dict[str, Any]]:
    import tensorflow as tf  # TF is only needed for this format

    plan = column_plan(config)
    compression = "GZIP" if path.endswith((".gz", ".gzip")) else ""
    rows = []
    for record in tf.data.TFRecordDataset(path, compression_type=compression).take(limit):
        feats = tf.train.Example.FromString(record.numpy()).features.feature
        row: dict[str, Any] = {}
        for column in _required_columns(config):
            if column not in feats:
                continue
            kind = feats[column].WhichOneof("kind")
            if kind is None:
                continue
            values = list(getattr(feats[column], kind).value)
            if kind == "bytes_list":
                values = [v.decode("utf-8", "replace") for v in values]
            feature = plan.get(column)
            is_list = feature is not None and feature.kind is Kind.CATEGORICAL_LIST
            row[column] = values if is_list else (values[0] if values else None)
        rows.append(row)
    return rows
