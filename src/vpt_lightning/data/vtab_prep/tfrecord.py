"""Read TFRecord files of ``tf.train.Example`` records without TensorFlow (DMLab's source is such files).

A TFRecord is a sequence of ``length (uint64 LE) | masked crc32c of length | data | masked crc32c of data``; an
Example is the protobuf ``Example{features: Features{feature: map<string, Feature>}}`` with ``Feature`` one of
``bytes_list`` (1), ``float_list`` (2), ``int64_list`` (3). Only what DMLab needs is decoded: bytes and int64.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Dict, Iterator, List, Tuple, Union

from ..datasets import DataError

Value = Union[List[bytes], List[int], List[float]]

_CRC_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits and add a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def records(path: Path, check_data_crc: bool = False) -> Iterator[Tuple[int, bytes]]:
    """``(offset of the data, data)`` of every record of a TFRecord file; a bad frame is an error naming it."""
    with open(path, "rb") as handle:
        while True:
            header = handle.read(12)
            if not header:
                return
            if len(header) < 12:
                raise DataError(f"{path}: truncated TFRecord header at byte {handle.tell() - len(header)}")
            (length,), (length_crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
            if masked_crc(header[:8]) != length_crc:
                raise DataError(
                    f"{path}: bad TFRecord length checksum at byte {handle.tell() - 12} (not a TFRecord file?)"
                )
            offset = handle.tell()
            data, footer = handle.read(length), handle.read(4)
            if len(data) < length or len(footer) < 4:
                raise DataError(f"{path}: truncated TFRecord at byte {offset}")
            if check_data_crc and masked_crc(data) != struct.unpack("<I", footer)[0]:
                raise DataError(f"{path}: bad TFRecord data checksum at byte {offset}")
            yield offset, data


def _varint(buf: bytes, pos: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[Tuple[int, Union[int, bytes]]]:
    """``(field number, value)`` of a protobuf message: varints as int, length-delimited fields as bytes."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise DataError(f"unsupported protobuf wire type {wire}")
        yield number, value


def parse_example(data: bytes) -> Dict[str, Value]:
    """The features of a serialized ``tf.train.Example``: name -> list of bytes / ints / floats."""
    features: Dict[str, Value] = {}
    for number, message in _fields(data):
        if number != 1:
            continue
        for entry_number, entry in _fields(message):  # Features.feature: map entries {1: key, 2: Feature}
            if entry_number != 1:
                continue
            name, feature = "", b""
            for field, value in _fields(entry):
                name, feature = (
                    (value.decode("utf-8"), feature) if field == 1 else (name, value if field == 2 else feature)
                )
            for kind, holder in _fields(feature):
                values: list = []
                for field, value in _fields(holder):
                    if field != 1:
                        continue
                    if kind == 1:
                        values.append(value)
                    elif kind == 3:  # packed varints, or one varint per field
                        if isinstance(value, int):
                            values.append(value - (1 << 64) if value >= 1 << 63 else value)
                        else:
                            pos = 0
                            while pos < len(value):
                                v, pos = _varint(value, pos)
                                values.append(v - (1 << 64) if v >= 1 << 63 else v)
                    elif kind == 2:
                        values.extend(struct.unpack(f"<{len(value) // 4}f", value) if isinstance(value, bytes) else [])
                features[name] = values
    return features
