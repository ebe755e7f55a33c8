"""Reading and writing tf.Transform's analyzer cache in few Beam stages.

The cache keeps, for each day (dataset key), one entry per analyzer: that day's accumulator.
tf.Transform's own ``ReadAnalysisCacheFromFS`` / ``WriteAnalysisCacheToFS`` give every entry a
Beam file read or a sharded file write of its own: a 7-day window of a dozen analyzers becomes
~80 reads, each with a file match and a reshuffle, and a dozen sharded writes, each with its
finalisation stages. On the DirectRunner those stages, not the accumulators, were most of a
cached day's datagen time.

Here the cache is read when the job is built (entries are small: accumulators, not rows) and
enters the pipeline as one in-memory collection split by entry, and what a job computed is
written by one grouped write. The files are tf.Transform's layout and format (a pickled
``MANIFEST`` of entry key -> index per dataset key, ``<index>-00000-of-00001.gz`` GZIP
TFRecords, a ``METADATA`` TFRecord), so either implementation reads what the other wrote. A
cache larger than :data:`EAGER_READ_BYTES` is read with tf.Transform's own transform, so a
distributed runner's job graph never carries a large one.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Mapping
from typing import Any

import apache_beam as beam

from transform.errors import WidedeepError
from transform.records import whole_records

MANIFEST_FILE = "MANIFEST"
METADATA_PREFIX = "METADATA"
SHARD_SUFFIX = "-00000-of-00001"
EAGER_READ_BYTES = 64 << 20
"""The largest cache (every entry of every day read) read when the job is built."""


class CacheError(WidedeepError, RuntimeError):
    """The analyzer cache cannot be read (a damaged file): remove the day's folder from it and
    that day is read from its input again."""


def _manifest(key_dir: str) -> dict[str, int]:
    """Entry key -> file index of one dataset key's cache (empty when it has none)."""
    import tensorflow as tf

    path = os.path.join(key_dir, MANIFEST_FILE)
    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path, "rb") as f:
        manifest = pickle.loads(f.read())
    return manifest if isinstance(manifest, dict) else {}


def _records(pattern: str, compression: str) -> list[bytes]:
    """The records of the TFRecord files matching ``pattern``.

    Read in Python (the files are small): a ``tf.data`` pipeline per entry costs tens of
    milliseconds to build, times every entry of every day of the window.
    """
    import gzip

    import tensorflow as tf

    records = []
    for path in sorted(tf.io.gfile.glob(pattern)):
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
        if compression == "GZIP":
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as error:
                raise CacheError(
                    f"{path}: a file of the analyzer cache is damaged ({error}); {_remedy(path)}"
                ) from None
        found, used = whole_records(data)
        if used != len(data):
            raise CacheError(f"{path}: a record of the analyzer cache is damaged; {_remedy(path)}")
        records.extend(found)
    return records


def _remedy(path: str) -> str:
    return f"remove {os.path.dirname(path)} and that day is analysed from its input again"


def _size(pattern: str) -> int:
    import tensorflow as tf

    return sum(tf.io.gfile.stat(f).length for f in tf.io.gfile.glob(pattern))


def read_cache(
    pipeline: beam.Pipeline,
    cache_dir: str,
    dataset_keys: Iterable[Any],
    merge_as: Any = None,
) -> Any:
    """The cache of ``dataset_keys`` as tf.Transform's ``BeamAnalysisCache``
    (DatasetKey -> DatasetCache), as ``ReadAnalysisCacheFromFS`` returns it.

    With ``merge_as`` (a DatasetKey), the days' caches come back as one dataset key's: each
    entry holds the records of that entry in every day. tf.Transform merges the accumulators of
    its dataset keys anyway (an entry's records are accumulators, or a vocabulary's token
    counts, combined after a flatten), so the analysis is the same, and tf.Transform's own work
    per dataset key (decoding, instrumenting, merging each cached entry) is done once for the
    window instead of once a day. Days whose caches do not hold the same entries are returned
    one key each.
    """
    from tensorflow_transform.beam import analyzer_cache

    keys = sorted(dataset_keys)
    manifests = {key: _manifest(os.path.join(cache_dir, key.key)) for key in keys}
    manifests = {key: m for key, m in manifests.items() if m}
    merge = (
        merge_as is not None
        and len(manifests) > 1
        and len({frozenset(m) for m in manifests.values()}) == 1
    )
    # (dataset key it is returned as, entry key or None for the metadata, file patterns)
    plan: list[tuple[Any, str | None, list[str]]] = []
    for key, manifest in manifests.items():
        key_dir = os.path.join(cache_dir, key.key)
        plan.extend((key, e, [os.path.join(key_dir, f"{i}-*-of-*")]) for e, i in manifest.items())
        plan.append((key, None, [os.path.join(key_dir, f"{METADATA_PREFIX}-*-of-*")]))
    if merge:
        merged: dict[str | None, list[str]] = {}
        for _, entry, patterns in plan:
            merged.setdefault(entry, []).extend(patterns)
        plan = [(merge_as, entry, patterns) for entry, patterns in merged.items()]
    if sum(_size(p) for _, _, patterns in plan for p in patterns) > EAGER_READ_BYTES:
        return pipeline | "ReadAnalyzerCacheFromFS" >> analyzer_cache.ReadAnalysisCacheFromFS(
            cache_dir, keys
        )
    tagged = []
    for i, (_, entry, patterns) in enumerate(plan):
        records = [r for p in patterns for r in _records(p, "GZIP" if _gzip(p) else "")]
        if entry is None:
            # One metadata record for the key: the merged days' sizes summed.
            size = sum(analyzer_cache.DatasetCacheMetadata.decode(r).dataset_size for r in records)
            records = [analyzer_cache.DatasetCacheMetadata(dataset_size=size).encode()]
        tagged.extend((i, r) for r in records)
    parts = (
        pipeline
        | "CreateCacheEntries" >> beam.Create(tagged, reshuffle=False)
        | "SplitCacheEntries" >> beam.Partition(lambda x, _: x[0], max(1, len(plan)))
    )
    result: dict[Any, Any] = {}
    for i, (key, entry, _) in enumerate(plan):
        cache = result.setdefault(key, analyzer_cache.DatasetCache({}, None))
        if entry is not None:
            cache.cache_dict[entry] = parts[i] | f"Untag[{i}]" >> beam.Map(lambda x: x[1])
        else:
            result[key] = cache._replace(
                metadata=parts[i]
                | f"DecodeMetadata[{i}]"
                >> beam.Map(lambda x: analyzer_cache.DatasetCacheMetadata.decode(x[1]))
            )
    return result


def _gzip(pattern: str) -> bool:
    import tensorflow as tf

    return any(f.endswith(".gz") for f in tf.io.gfile.glob(pattern))


def write_cache(cache: Mapping[Any, Any], cache_dir: str) -> Any:
    """Writes the cache a job computed (``AnalyzeDatasetWithCache``'s second output) under
    ``cache_dir`` in tf.Transform's layout; returns the PCollection of written file paths.

    Each dataset key's manifest is written when the job is built, as tf.Transform does: the
    caller moves ``cache_dir`` into the real cache only after the job succeeded.
    """
    import tensorflow as tf

    tagged = []
    for n, (key, entries) in enumerate(sorted(cache.items())):
        key_dir = os.path.join(cache_dir, key.key)
        tf.io.gfile.makedirs(key_dir)
        manifest = {}
        for index, (entry, records) in enumerate(entries.cache_dict.items()):
            manifest[entry] = index
            path = os.path.join(key_dir, f"{index}{SHARD_SUFFIX}.gz")
            tagged.append(records | f"Tag[{n}][{index}]" >> beam.Map(lambda r, p=path: (p, r)))
        if entries.metadata is not None:
            path = os.path.join(key_dir, f"{METADATA_PREFIX}{SHARD_SUFFIX}")
            if isinstance(entries.metadata, beam.pvalue.PCollection):
                tagged.append(
                    entries.metadata
                    | f"TagMetadata[{n}]" >> beam.Map(lambda m, p=path: (p, m.encode()))
                )
            else:
                _write_file(path, [entries.metadata.encode()])
        with tf.io.gfile.GFile(os.path.join(key_dir, MANIFEST_FILE), "wb") as f:
            f.write(pickle.dumps(manifest, protocol=0))
    if not tagged:
        return None
    return (
        tagged
        | "FlattenCacheEntries" >> beam.Flatten()
        | "GroupByFile" >> beam.GroupByKey()
        | "WriteCacheFiles" >> beam.MapTuple(_write_file)
    )


def _write_file(path: str, records: Iterable[bytes]) -> str:
    """Writes one TFRecord file (GZIP when its name ends in .gz) under a temporary name, then
    renames it: a file of the cache is complete or absent."""
    import tensorflow as tf

    options = tf.io.TFRecordOptions(compression_type="GZIP" if path.endswith(".gz") else "")
    partial = f"{path}.partial"
    with tf.io.TFRecordWriter(partial, options) as writer:
        for record in records:
            writer.write(record)
    tf.io.gfile.rename(partial, path, overwrite=True)
    return path
