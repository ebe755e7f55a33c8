"""Data generation (paper section 4.1): the Beam + tf.Transform job.

Impression logs in, training data out: vocabularies of every categorical feature seen at least
``min_count`` times, quantile boundaries of every numeric feature, the wide tower's
cross-product transformations, a deterministic train/eval split, the transform graph, the raw
schema, gzipped transformed TFRecords and a summary; and, from the same pass over the input, the
statistics of its raw columns and their anomalies against a reference (data validation:
:mod:`pipeline.statistics`, :mod:`pipeline.anomalies`).

Its output layout is the datagen-output contract of :mod:`transform.artifacts`.

The job is built by :func:`build_pipeline`, a pure factory; :func:`run_datagen` adds the
checks, the runner and the output folder handling. Any Beam runner works: the pipeline has no
runner-specific step and reads and writes through Beam's filesystems.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import anomalies as data_validation
from pipeline import sources
from pipeline.analyzer_cache import read_cache, write_cache
from pipeline.sources import InputFiles, InputFormat
from pipeline.statistics import CombineStatistics, batch_statistics, format_statistics
from pipeline.statistics import merge as merge_statistics
from pipeline.tfrecords import WriteFramedTFRecords, frame_records
from transform import artifacts
from transform.artifacts import (
    ANOMALIES_JSON,
    ANOMALIES_PNG,
    CONFIG_YAML,
    EVAL_DIR,
    EVAL_RAW_DIR,
    RAW_METADATA_DIR,
    SHARD_PREFIX,
    SHARD_SUFFIX,
    STATISTICS_JSON,
    SUMMARY_JSON,
    SUMMARY_TXT,
    TRAIN_DIR,
)
from transform.config import Config
from transform.errors import OutputExistsError
from transform.paths import locked, remove_leftovers

log = logging.getLogger(__name__)

_STATS_NAME = "_stats"
_COLUMN_STATS = "_column_stats"


@dataclass(frozen=True)
class WindowDay:
    """An earlier day of the analysis window (``data.window_days``).

    Its training rows count in the vocabularies and quantile boundaries of the new day but are
    not written again: the new day's output holds only the new day's rows.
    """

    key: str
    """The day's dataset key in the analyzer cache (letters, digits, ``.``, ``-``, ``_``)."""
    input: str | Sequence[str]
    """The day's input (file globs or folders); read only when the cache lacks the day."""
    split_salt: str = ""
    """The salt of the day's own train/eval split (see ``sources.split_mask``)."""


@dataclass(frozen=True)
class _Analysis:
    """What the analyzers run over: the earlier days of the window and the analyzer cache."""

    earlier: tuple[tuple[str, InputFiles | None, str], ...] = ()
    """(dataset key, files, split salt) of each earlier day, oldest first; files None: read
    from cache."""
    cache_dir: str | None = None
    """The analyzer cache (None: every day of the window is analysed from its rows)."""
    key: str | None = None
    """The new day's dataset key in the cache."""
    write_dir: str | None = None
    """Where this run writes the accumulators it computed (moved into the cache on success)."""


@dataclass(frozen=True)
class DatagenResult:
    """What a finished datagen run wrote."""

    out_dir: Path
    summary: dict[str, Any]
    statistics: dict[str, Any]
    """The input's statistics (``statistics.json``)."""
    anomalies: list[data_validation.Anomaly]
    """What data validation found (``anomalies.json``)."""


# --------------------------------------------------------------------------------------------
# Beam pieces


class ReadLogBatches(beam.DoFn):
    """Reads one Parquet or CSV file into TFXIO-layout batches, split into train and eval."""

    def __init__(
        self,
        config: Config,
        fmt: InputFormat,
        batch_rows: int,
        arrow_schema: pa.Schema,
        int_columns: Sequence[str] = (),
        split_salt: str = "",
    ):
        self._config = config
        self._salt = split_salt
        self._format = fmt
        self._int_columns = tuple(int_columns)
        self._batch_rows = batch_rows
        self._schema = arrow_schema
        self._rows = beam.metrics.Metrics.counter("widedeep", "rows_read")

    def process(self, path: str) -> Iterator[Any]:
        started = time.monotonic()
        rows = 0
        if self._format is InputFormat.PARQUET:
            raw = sources.iter_parquet(self._config, path, self._batch_rows)
        else:
            raw = sources.iter_csv(self._config, path, self._batch_rows, self._int_columns)
        stats: dict[str, Any] = {}
        for batch in raw:
            if batch.num_rows == 0:
                continue
            rows += batch.num_rows
            self._rows.inc(batch.num_rows)
            # Before missing values are filled in: the statistics see the log as it is.
            stats = merge_statistics(stats, batch_statistics(self._config, batch))
            batch = sources.to_tfxio_batch(self._config, batch, path, self._int_columns)
            yield from _split(self._config, batch, self._schema, self._salt)
        yield beam.pvalue.TaggedOutput(_COLUMN_STATS, stats)
        log.info("read %s: %d rows in %.1f s", path, rows, time.monotonic() - started)


class SplitBatches(beam.DoFn):
    """Splits decoded TFRecord batches (already in the TFXIO layout) into train and eval."""

    def __init__(self, config: Config, arrow_schema: pa.Schema, where: str, split_salt: str = ""):
        self._config = config
        self._schema = arrow_schema
        self._where = where
        self._salt = split_salt

    def process(self, batch: pa.RecordBatch) -> Iterator[Any]:
        batch = sources.split_joined_lists(self._config, batch)
        yield beam.pvalue.TaggedOutput(
            _COLUMN_STATS, batch_statistics(self._config, batch, decoded=True)
        )
        batch = sources.fill_missing(self._config, batch, self._where)
        yield from _split(self._config, batch, self._schema, self._salt)


def _split(config: Config, batch: pa.RecordBatch, schema: pa.Schema, salt: str) -> Iterator[Any]:
    is_eval = sources.split_mask(config, batch, salt)
    batch = sources.drop_split_column(config, batch)
    # The tensor adapter finds columns by position in its schema: match it exactly.
    batch = pa.RecordBatch.from_arrays([batch.column(n) for n in schema.names], schema=schema)
    label = batch.column(schema.get_field_index(config.label)).flatten().to_numpy()
    for tag, mask in ((TRAIN_DIR, ~is_eval), (EVAL_DIR, is_eval)):
        count = int(mask.sum())
        if count == 0:
            continue
        part = batch if count == batch.num_rows else batch.filter(pa.array(mask))
        yield beam.pvalue.TaggedOutput(tag, part)
        yield beam.pvalue.TaggedOutput(_STATS_NAME, (tag, count, int(label[mask].sum())))


class _SumStats(beam.CombineFn):
    """Rows and positive labels per split."""

    def create_accumulator(self) -> dict[str, list[int]]:
        return {}

    def add_input(
        self, acc: dict[str, list[int]], item: tuple[str, int, int]
    ) -> dict[str, list[int]]:
        split, rows, positives = item
        cur = acc.setdefault(split, [0, 0])
        cur[0] += rows
        cur[1] += positives
        return acc

    def merge_accumulators(self, accs: Any) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for acc in accs:
            for split, (rows, positives) in acc.items():
                cur = out.setdefault(split, [0, 0])
                cur[0] += rows
                cur[1] += positives
        return out

    def extract_output(self, acc: dict[str, list[int]]) -> str:
        return json.dumps({k: {"rows": v[0], "positives": v[1]} for k, v in acc.items()})


def _encode(batch_and_passthrough: Any) -> bytes:
    """A transformed record batch as one blob of framed TFRecords of tf.Example."""
    from tfx_bsl.coders import example_coder  # heavy: workers import it when they need it

    batch = batch_and_passthrough
    if isinstance(batch, tuple):  # (record batch, passthrough features)
        batch = batch[0]
    return frame_records(example_coder.RecordBatchToExamples(batch))


def build_pipeline(
    p: beam.Pipeline,
    config: Config,
    files: InputFiles,
    out_dir: str,
    batch_rows: int = 8192,
    analysis: _Analysis | None = None,
    split_salt: str = "",
) -> None:
    """Adds the data generation job to ``p``; every step is named.

    With ``analysis``, the analyzers also see the training rows of the window's earlier days
    (read from the analyzer cache where it holds them); only the new day's rows are written.
    ``split_salt`` draws the train/eval split (see ``sources.split_mask``).
    Must run inside a ``tft_beam.Context`` (see :func:`run_datagen`).
    """
    import tensorflow_transform.beam as tft_beam
    from tfx_bsl.tfxio import tf_example_record

    from transform.features import make_preprocessing_fn

    # The log's own types: columns it holds as integers stay int64 (see InputFiles.int_columns).
    schema = raw_schema(config, int_columns=files.int_columns)
    tfxio = tf_example_record.TFExampleBeamRecord(
        physical_format="tfrecord", schema=schema, telemetry_descriptors=["widedeep"]
    )
    arrow_schema = tfxio.ArrowSchema()

    split = _read_and_split(p, config, files, arrow_schema, batch_rows, "", split_salt)

    adapter_config = tfxio.TensorAdapterConfig()
    preprocessing_fn = make_preprocessing_fn(config)
    if analysis is None:
        (train, _), transform_fn = (
            split[TRAIN_DIR],
            adapter_config,
        ) | "AnalyzeAndTransformTrain" >> tft_beam.AnalyzeAndTransformDataset(
            preprocessing_fn, output_record_batches=True
        )
    else:
        transform_fn = _analyze_window(
            p, config, analysis, split[TRAIN_DIR], adapter_config, arrow_schema, batch_rows
        )
        train, _ = (
            (split[TRAIN_DIR], adapter_config),
            transform_fn,
        ) | "TransformTrain" >> tft_beam.TransformDataset(output_record_batches=True)
    eval_data, _ = (
        (split[EVAL_DIR], adapter_config),
        transform_fn,
    ) | "TransformEval" >> tft_beam.TransformDataset(output_record_batches=True)

    _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(out_dir)
    # The raw eval rows are kept too: models built on other vocabularies (the one being served,
    # the next one) can only be compared on raw examples, and the dry run sends raw requests.
    outputs = ((TRAIN_DIR, train), (EVAL_DIR, eval_data), (EVAL_RAW_DIR, split[EVAL_DIR]))
    for name, data in outputs:
        step = "".join(part.capitalize() for part in name.split("_"))
        _ = (
            data
            | f"Encode{step}Examples" >> beam.Map(_encode)
            | f"Write{step}TFRecords"
            >> WriteFramedTFRecords(os.path.join(out_dir, name, SHARD_PREFIX), SHARD_SUFFIX)
        )
    _ = (
        split[_STATS_NAME]
        | "CountRowsAndLabels" >> beam.CombineGlobally(_SumStats())
        | "WriteCounts"
        >> beam.io.WriteToText(
            os.path.join(out_dir, _STATS_NAME), shard_name_template="", file_name_suffix=".json"
        )
    )
    # Statistics of the raw columns, in the same pass over the input (data validation).
    _ = (
        split[_COLUMN_STATS]
        | "ComputeStatistics" >> beam.CombineGlobally(CombineStatistics(config))
        | "WriteStatistics"
        >> beam.io.WriteToText(os.path.join(out_dir, STATISTICS_JSON), shard_name_template="")
    )


def _read_and_split(
    p: beam.Pipeline,
    config: Config,
    files: InputFiles,
    arrow_schema: pa.Schema,
    batch_rows: int,
    prefix: str,
    split_salt: str,
) -> Any:
    """Reads one day's input into train and eval batches (and their counts and statistics)."""
    from tfx_bsl.tfxio import tf_example_record

    if files.format is InputFormat.TFRECORD:
        decode_tfxio = tf_example_record.TFExampleRecord(
            file_pattern=list(files.paths),
            schema=raw_schema(
                config,
                split_column_dtype=files.split_column_dtype,
                int_columns=files.int_columns,
                float_label=files.float_label,
            ),
            telemetry_descriptors=["widedeep"],
        )
        split = (
            p
            | f"{prefix}ReadTFRecords" >> decode_tfxio.BeamSource(batch_size=batch_rows)
            | f"{prefix}SplitTrainEval"
            >> beam.ParDo(
                SplitBatches(config, arrow_schema, ", ".join(files.paths[:3]), split_salt)
            ).with_outputs(TRAIN_DIR, EVAL_DIR, _STATS_NAME, _COLUMN_STATS)
        )
    else:
        split = (
            p
            | f"{prefix}ListInputFiles" >> beam.Create(list(files.paths))
            # Spread files over workers: without this, a runner may read them all in one.
            | f"{prefix}SpreadFiles" >> beam.Reshuffle()
            | f"{prefix}Read{files.format.value.capitalize()}AndSplit"
            >> beam.ParDo(
                ReadLogBatches(
                    config, files.format, batch_rows, arrow_schema, files.int_columns, split_salt
                )
            ).with_outputs(TRAIN_DIR, EVAL_DIR, _STATS_NAME, _COLUMN_STATS)
        )

    return split


def _analyze_window(
    p: beam.Pipeline,
    config: Config,
    analysis: _Analysis,
    train: Any,
    adapter_config: Any,
    arrow_schema: pa.Schema,
    batch_rows: int,
) -> Any:
    """The transform function of the new day's training rows and the window's earlier days'.

    With a cache, the new day's rows are analysed under its own dataset key, the earlier days'
    accumulators are read from the cache (an earlier day it lacks is read and analysed too), and
    what was computed is written to ``analysis.write_dir``. Without one, every day's rows are
    analysed together.
    """
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.beam import analyzer_cache

    from transform.features import make_preprocessing_fn

    preprocessing_fn = make_preprocessing_fn(config)
    earlier = {}
    for i, (key, files, salt) in enumerate(analysis.earlier):
        if files is None:
            earlier[key] = None
            continue
        day = _read_and_split(p, config, files, arrow_schema, batch_rows, f"Window[{i}]", salt)
        earlier[key] = day[TRAIN_DIR]
    if analysis.cache_dir is None:
        rows = (train, *earlier.values()) | "FlattenWindow" >> beam.Flatten()
        return (rows, adapter_config) | "AnalyzeWindow" >> tft_beam.AnalyzeDataset(preprocessing_fn)
    assert analysis.key is not None and analysis.write_dir is not None
    keys = {k: analyzer_cache.DatasetKey(k) for k in (*earlier, analysis.key)}
    cached = [keys[k] for k, files, _ in analysis.earlier if files is None]
    # The cached days as one dataset key: tf.Transform's work per key is done once.
    together = analyzer_cache.DatasetKey(f"{analysis.key}.window")
    input_cache = read_cache(p, analysis.cache_dir, cached, merge_as=together) if cached else {}
    data = {keys[k]: v for k, v in earlier.items() if v is not None}
    data.update((key, None) for key in input_cache)
    data[keys[analysis.key]] = train
    transform_fn, output_cache = (
        data,
        input_cache,
        adapter_config,
    ) | "AnalyzeWindowWithCache" >> tft_beam.AnalyzeDatasetWithCache(preprocessing_fn, p)
    # Only days are kept in the cache, never the window's merged key.
    write_cache({k: v for k, v in output_cache.items() if k != together}, analysis.write_dir)
    return transform_fn


def raw_schema(
    config: Config,
    split_column_dtype: str | None = None,
    int_columns: Sequence[str] = (),
    float_label: bool = False,
) -> Any:
    """The raw data's schema (tensorflow_metadata Schema proto) derived from the config.

    Args:
      config: The pipeline config.
      split_column_dtype: When given, the ``data.split_by`` column (if no feature reads it)
        is added with this dtype (``string``, ``int`` or ``float``), to decode TFRecord input.
      int_columns: Columns the log holds as integers: int64 in the schema (recorded under
        ``metadata/``, it is how the serving signatures parse them).
      float_label: The label is a float (a TFRecord log's float_list), to decode TFRecord
        input; data generation makes it int64 (see ``sources.fill_missing``).
    """
    import tensorflow as tf
    from tensorflow_transform.tf_metadata import schema_utils

    from transform.features import raw_feature_spec

    spec = raw_feature_spec(config, int_columns=int_columns, float_label=float_label)
    split_by = config.data.split_by
    if split_column_dtype and split_by and split_by not in spec:
        dtype = {"int": tf.int64, "float": tf.float32}.get(split_column_dtype, tf.string)
        spec[split_by] = tf.io.VarLenFeature(dtype)
    return schema_utils.schema_from_feature_spec(spec)


# --------------------------------------------------------------------------------------------
# Running it


def run_datagen(
    config: Config,
    input_patterns: str | Sequence[str],
    out_dir: str | Path,
    *,
    input_format: InputFormat | None = None,
    overwrite: bool = False,
    beam_args: Sequence[str] = (),
    batch_rows: int = 8192,
    echo: Callable[[str], None] | None = print,
    wait: bool = False,
    reference: str | Path | None = None,
    window: Sequence[WindowDay] = (),
    cache_dir: str | Path | None = None,
    cache_key: str | None = None,
    split_salt: str = "",
) -> DatagenResult:
    """Runs data generation end to end and returns its summary.

    The input and the output folder are checked before Beam starts. Results are written to a
    sibling ``<out_dir>.partial`` folder and moved into place only when the job succeeded, so an
    interrupted or failed run never leaves half an output, and ``overwrite`` replaces an earlier
    output only once the new one is complete. The output is locked while the job runs (a
    hidden ``.<name>.lock`` file beside it): a second run on the same output fails at once
    naming the first one's PID, or waits for it; what an interrupted run left beside the output
    is removed by the next one.

    Args:
      config: The pipeline config.
      input_patterns: File glob(s) or folder(s) of the impression log.
      out_dir: Output folder (local path).
      input_format: Format of the input; detected from the file names when None.
      overwrite: Replace an output folder that already holds results.
      beam_args: Beam pipeline options (``--runner``, ``--direct_num_workers``, ...).
      batch_rows: Rows per Arrow batch read from the input.
      echo: Where the summary is printed; None to stay quiet.
      wait: When another process is writing ``out_dir``, wait for it instead of failing.
      reference: The statistics the input is validated against: a datagen output folder or
        its ``statistics.json``; None runs only the checks that need no reference. The
        anomalies are printed and written, whatever their severity: the caller decides.
      window: The earlier days of the analysis window, oldest first: their training rows
        count in the vocabularies and quantile boundaries, but only the input's rows are
        written (``data.window_days`` is the caller's: it passes the days it keeps).
      cache_dir: tf.Transform's analyzer cache, one dataset key a day: the input's
        accumulators are written under ``cache_key`` once the job succeeded, and an earlier
        day whose accumulators are there is not read again. None analyses every day of the
        window from its rows.
      cache_key: The input's dataset key in the cache (required with ``cache_dir``).
      split_salt: Draws another train/eval split of the same keys (``widedeep run`` gives
        each day its own, so no user is held out of training every day); "" for the split
        every standalone run of the same log gives.

    Raises:
      ArtifactError: ``reference`` is not a readable statistics file.
      OutputExistsError: ``out_dir`` holds results and ``overwrite`` is False.
      InUseError: another process is writing ``out_dir`` (and ``wait`` is False).
      sources.InputError: the input cannot be read as the config describes, the output
        folder is inside the input (or the input inside it), or the train split is empty.
    """
    out = Path(out_dir).absolute()
    _check_out_free(out, overwrite)
    ref = None
    if reference is not None:
        ref = artifacts.read_statistics(reference)
        ref["path"] = str(Path(reference).absolute())
    files = sources.resolve_input(input_patterns, input_format)
    sources.check_output_apart(input_patterns, files, out)
    files = sources.preflight(config, files)
    analysis = _plan_analysis(config, window, cache_dir, cache_key)
    say = echo or log.info
    with locked(lock_file(out), f"the datagen output {out}", wait=wait, echo=say):
        _check_out_free(out, overwrite)  # again: another run may have finished meanwhile
        # Holding the lock, what an earlier run left beside the output is no live run's.
        name = glob.escape(out.name)
        for path in remove_leftovers(out.parent, [f"{name}.partial", f"{name}.old-*"]):
            log.info("datagen: removed %s, left by an interrupted run", path)
        return _run_locked(
            config, files, out, beam_args, batch_rows, echo, ref, analysis, split_salt
        )


def _plan_analysis(
    config: Config,
    window: Sequence[WindowDay],
    cache_dir: str | Path | None,
    cache_key: str | None,
) -> _Analysis | None:
    """Which days of the window are read and which come from the analyzer cache."""
    if not window and cache_dir is None:
        return None
    if cache_dir is not None and not cache_key:
        raise ValueError("run_datagen: cache_dir needs a cache_key (the input's dataset key)")
    earlier = []
    for day in window:
        if cache_dir is not None and cached_day(cache_dir, day.key):
            earlier.append((day.key, None, day.split_salt))
            continue
        files = sources.preflight(config, sources.resolve_input(day.input))
        earlier.append((day.key, files, day.split_salt))
    return _Analysis(
        earlier=tuple(earlier),
        cache_dir=None if cache_dir is None else str(Path(cache_dir).absolute()),
        key=cache_key,
    )


def cached_day(cache_dir: str | Path, key: str) -> bool:
    """Whether the analyzer cache holds the accumulators of the day with dataset key ``key``.

    A day's folder is moved into the cache whole, once its job succeeded: present is complete.
    """
    from tensorflow_transform.beam import analyzer_cache

    return (Path(cache_dir) / analyzer_cache.DatasetKey(key).key).is_dir()


def _keep_cache(written: Path, cache_dir: Path) -> None:
    """Moves each day's accumulators a job wrote into the cache; a day already there (read,
    not computed) keeps its folder, the job's own day replaces an older one."""
    for day in sorted(written.iterdir()):
        if not day.is_dir():
            continue
        target = cache_dir / day.name
        if target.exists():
            old = target.with_name(f".{day.name}.old-{os.getpid()}")
            target.rename(old)
            day.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            day.rename(target)


def lock_file(out: Path) -> Path:
    """The lock file of a datagen output folder: a hidden file beside it."""
    return out.with_name(f".{out.name}.lock")


def _check_out_free(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{out}: already holds results; pass --overwrite to replace them "
            "(they are kept until the new output is complete)"
        )


LOCAL_RUNNER_NAMES = frozenset({"direct", "directrunner", "switchingdirectrunner"})
"""``--runner`` values (lower case) that mean Beam's local runner; no ``--runner`` means it too."""


def local_runner(options: PipelineOptions) -> Any:
    """The runner of a local job: Beam's portable Python runner (FnApiRunner); None (Beam picks
    the runner from ``--runner``) for any other runner.

    Beam's DirectRunner first tries its Prism runner, a binary it downloads from GitHub on
    first use: without network access that fails (leaving a folder in the temp dir each time)
    and it falls back to this runner; with network access it downloads and runs a different
    runner than the one this project is tested on. Going straight to the runner it falls back
    to gives the same runner everywhere and downloads nothing. ``--runner PrismRunner`` still
    asks for Prism. The pipeline options reach the runner's workers as DirectRunner passes
    them (``--direct_num_workers``, ``--direct_running_mode``).
    """
    from apache_beam.options.pipeline_options import StandardOptions

    name = options.view_as(StandardOptions).runner
    if name is not None and str(name).lower() not in LOCAL_RUNNER_NAMES:
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(info))


def _run_locked(
    config: Config,
    files: InputFiles,
    out: Path,
    beam_args: Sequence[str],
    batch_rows: int,
    echo: Callable[[str], None] | None,
    reference: dict[str, Any] | None = None,
    analysis: _Analysis | None = None,
    split_salt: str = "",
) -> DatagenResult:
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import dataset_metadata, metadata_io

    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True)
    started = time.monotonic()
    options = PipelineOptions(list(beam_args))
    log.info("datagen: %d %s file(s) -> %s", len(files.paths), files.format.value, out)
    written = None
    try:
        temp_dir = tempfile.mkdtemp(prefix="tft-", dir=partial)
        if analysis is not None and analysis.cache_dir is not None:
            # What the job computes goes beside the cache first: a failed job leaves no half
            # day in it (tf.Transform writes a day's manifest before its accumulators).
            cache_dir = Path(analysis.cache_dir)
            cache_dir.mkdir(parents=True, exist_ok=True)
            # Named after the day: a run killed before it finished left this folder, and the
            # next run of the day (holding the output's lock) starts it afresh.
            written = cache_dir / f".partial-{analysis.key}"
            if written.exists():
                log.info("datagen: removed %s, left by an interrupted run", written)
                shutil.rmtree(written)
            written.mkdir()
            analysis = replace(analysis, write_dir=str(written))
        with (
            beam.Pipeline(runner=local_runner(options), options=options) as p,
            tft_beam.Context(temp_dir=temp_dir),
        ):
            build_pipeline(
                p,
                config,
                files,
                str(partial),
                batch_rows=batch_rows,
                analysis=analysis,
                split_salt=split_salt,
            )
        shutil.rmtree(temp_dir, ignore_errors=True)
        if written is not None:
            _keep_cache(written, written.parent)
        metadata_io.write_metadata(
            dataset_metadata.DatasetMetadata(raw_schema(config, int_columns=files.int_columns)),
            str(partial / RAW_METADATA_DIR),
        )
        (partial / CONFIG_YAML).write_text(config.to_yaml())
        summary = summarize(config, files, partial, time.monotonic() - started)
        if split_salt:
            summary["split_salt"] = split_salt  # which of the log's splits this output holds
        if summary["splits"].get(EVAL_DIR, {}).get("rows", 0) == 0:
            log.warning("datagen: the eval split is empty; raise data.eval_fraction or add rows")
        statistics, anomalies = _validate_data(config, partial, reference)
        ref_path = reference["path"] if reference else None
        summary["data_validation"] = {
            "reference": ref_path,
            "anomalies": len(anomalies),
            "blocking": len(data_validation.blocking(anomalies)),
        }
        (partial / SUMMARY_JSON).write_text(json.dumps(summary, indent=2))
        text = "\n".join(
            [
                format_summary(summary, out),
                *format_statistics(statistics),
                data_validation.format_anomalies(anomalies, ref_path),
            ]
        )
        (partial / SUMMARY_TXT).write_text(text + "\n")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        if written is not None:
            shutil.rmtree(written, ignore_errors=True)
    _replace(partial, out)
    if echo is not None:
        echo(text)
    return DatagenResult(out_dir=out, summary=summary, statistics=statistics, anomalies=anomalies)


def _validate_data(
    config: Config, out: Path, reference: dict[str, Any] | None
) -> tuple[dict[str, Any], list[data_validation.Anomaly]]:
    """The statistics the job wrote, and their anomalies (``anomalies.json``, and a plot of
    the columns that moved when there is a reference)."""
    statistics = artifacts.read_statistics(out)
    anomalies = data_validation.find_anomalies(config, statistics, reference)
    ref_path = reference["path"] if reference else None
    report = data_validation.report(anomalies, statistics, ref_path)
    if reference is not None and data_validation.plot_drift(
        out / ANOMALIES_PNG, statistics, reference, anomalies
    ):
        report["plot"] = ANOMALIES_PNG
    data_validation.write_report(out / ANOMALIES_JSON, report)
    return statistics, anomalies


def _replace(new: Path, out: Path) -> None:
    """Moves ``new`` to ``out``; an existing ``out`` is removed only after the move."""
    old = None
    if out.exists():
        old = out.with_name(out.name + f".old-{os.getpid()}")
        out.rename(old)
    new.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Summary


def summarize(config: Config, files: InputFiles, out_dir: Path, seconds: float) -> dict[str, Any]:
    """What the run saw and wrote: rows, label rates, vocabulary sizes, quantile boundaries."""
    import tensorflow_transform as tft

    from transform.features import NUM_OOV_BUCKETS, read_quantile_boundaries

    stats_path = out_dir / f"{_STATS_NAME}.json"
    counts = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    stats_path.unlink(missing_ok=True)
    splits = {}
    for name in (TRAIN_DIR, EVAL_DIR):
        c = counts.get(name, {"rows": 0, "positives": 0})
        shards = sorted(p.name for p in (out_dir / name).glob(f"*{SHARD_SUFFIX}"))
        splits[name] = {
            "rows": c["rows"],
            "label_rate": c["positives"] / c["rows"] if c["rows"] else None,
            "shards": len(shards),
        }
    total = sum(s["rows"] for s in splits.values())
    if total == 0:
        raise sources.InputError("--input: the input holds no rows")
    if splits[TRAIN_DIR]["rows"] == 0:
        by = f"data.split_by column {config.data.split_by!r}" if config.data.split_by else "row"
        raise sources.InputError(
            f"--input: all {total:,} rows went to the eval split and none to train (split by "
            f"{by}, data.eval_fraction {config.data.eval_fraction}); add rows, or lower "
            "data.eval_fraction, or split by a column with more distinct values"
        )
    tft_output = tft.TFTransformOutput(str(out_dir))
    vocabularies = {}
    for vocab, members in config.vocabularies.items():
        vocabularies[vocab] = {
            "size": int(tft_output.vocabulary_size_by_name(vocab)),
            "oov_buckets": NUM_OOV_BUCKETS,
            "min_count": members[0].min_count,
            "features": [f.name for f in members],
        }
    boundaries = read_quantile_boundaries(str(out_dir))
    return {
        "model_name": config.model_name,
        "config_fingerprint": config.fingerprint(),
        "input": {
            "format": files.format.value,
            "files": len(files.paths),
            "paths": list(files.paths[:20]),
        },
        "rows": total,
        # Columns kept as the log's int64 (the serving signatures parse them so).
        "int_columns": list(files.int_columns),
        "splits": splits,
        "vocabularies": vocabularies,
        "quantiles": {
            f.name: {"quantiles": f.quantiles, "boundaries": boundaries.get(f.name)}
            for f in config.numeric_features
        },
        "crosses": {
            c.name: {"features": list(c.features), "hash_buckets": c.hash_buckets}
            for c in config.crosses
        },
        "seconds": round(seconds, 2),
        "rows_per_second": round(total / seconds, 1) if seconds > 0 else None,
    }


def format_summary(summary: dict[str, Any], out_dir: Path | str) -> str:
    """The summary as the few lines a person reads at the end of the run."""
    tr, ev = summary["splits"][TRAIN_DIR], summary["splits"][EVAL_DIR]

    def rate(s: dict[str, Any]) -> str:
        return "n/a" if s["label_rate"] is None else f"{s['label_rate']:.4f}"

    lines = [
        f"datagen finished in {summary['seconds']:.1f} s "
        f"({summary['rows_per_second'] or 0:,.0f} rows/s): {out_dir}",
        f"  input       {summary['input']['files']} {summary['input']['format']} file(s), "
        f"{summary['rows']:,} rows",
        f"  train       {tr['rows']:,} rows, label rate {rate(tr)}, {tr['shards']} shard(s)",
        f"  eval        {ev['rows']:,} rows, label rate {rate(ev)}, {ev['shards']} shard(s)",
    ]
    if summary.get("int_columns"):
        lines.append(
            "  int64       "
            + ", ".join(summary["int_columns"])
            + " (integers in the log: served as int64 too)"
        )
    lines += [
        "  vocabularies (tokens seen >= min_count, + OOV bucket):",
    ]
    for name, v in summary["vocabularies"].items():
        shared = f"  shared by {', '.join(v['features'])}" if len(v["features"]) > 1 else ""
        lines.append(f"    {name:<24} {v['size']:>9,}  (min_count {v['min_count']}){shared}")
    if summary["quantiles"]:
        lines.append("  quantile boundaries:")
    for name, q in summary["quantiles"].items():
        b = q["boundaries"]
        shown = "unavailable" if b is None else ", ".join(_short(x) for x in _ends(b))
        lines.append(f"    {name:<24} n_q={q['quantiles']:<3} [{shown}]")
    for name, c in summary["crosses"].items():
        lines.append(
            f"  cross       {name}: {' x '.join(c['features'])}, {c['hash_buckets']:,} hash buckets"
        )
    return "\n".join(lines)


def _ends(values: list[float], keep: int = 4) -> list[Any]:
    if len(values) <= 2 * keep:
        return values
    return [*values[:keep], "...", *values[-keep:]]


def _short(x: Any) -> str:
    return x if isinstance(x, str) else f"{x:.4g}"
