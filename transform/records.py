"""TFRecord framing without TensorFlow: writing whole records, reading what was written whole.

A TFRecord is ``length (uint64 LE) | masked CRC-32C of length | data | masked CRC-32C of
data``. Framing records here (instead of ``tf.io.TFRecordWriter``, which buffers and may leave
half a record behind a killed process) lets a writer hand the file system one whole record per
write, and lets a reader stop cleanly at a record cut short, as a process killed mid-write
leaves it. The files are standard TFRecord files: ``tf.data.TFRecordDataset`` reads them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import google_crc32c

_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
HEADER_BYTES = _LENGTH.size + _CRC.size
FOOTER_BYTES = _CRC.size


def masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C that frames TFRecords."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(record: bytes) -> bytes:
    """One serialized record framed as a TFRecord (length, CRCs, data)."""
    header = _LENGTH.pack(len(record))
    return b"".join(
        (header, _CRC.pack(masked_crc32c(header)), record, _CRC.pack(masked_crc32c(record)))
    )


def frame_records(records: Iterable[bytes]) -> bytes:
    """Serialized records framed as consecutive TFRecords."""
    return b"".join(frame_record(record) for record in records)


def whole_records(data: bytes) -> tuple[list[bytes], int]:
    """The records of an uncompressed TFRecord file's bytes, up to the first one that is cut
    short or fails its checksum, and the number of bytes those whole records take."""
    records: list[bytes] = []
    offset = 0
    while offset + HEADER_BYTES <= len(data):
        header = data[offset : offset + _LENGTH.size]
        (crc,) = _CRC.unpack_from(data, offset + _LENGTH.size)
        if crc != masked_crc32c(header):
            break
        (length,) = _LENGTH.unpack(header)
        start = offset + HEADER_BYTES
        end = start + length
        if end + FOOTER_BYTES > len(data):
            break
        record = data[start:end]
        (crc,) = _CRC.unpack_from(data, end)
        if crc != masked_crc32c(record):
            break
        records.append(record)
        offset = end + FOOTER_BYTES
    return records, offset


def read_records(path: str | Path) -> Iterator[bytes]:
    """The whole records of an uncompressed TFRecord file (a cut-short tail is left out)."""
    records, _ = whole_records(Path(path).read_bytes())
    yield from records
