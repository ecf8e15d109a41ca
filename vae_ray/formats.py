"""Byte-exact, fast encoders for generated images.

- PNG: a minimal encoder (IHDR, one IDAT, IEND; filter type 0) written with
  numpy and zlib. For 28x28 images it is several times faster than going
  through Pillow per image, and its bytes depend only on the pixels, so the
  same images always give byte-identical files.
- NPZ: numpy's `savez` stamps the current time into the zip; this writer
  fixes the timestamp so shards are reproducible.
- Parquet: the same schema as prepared datasets (raw uint8 image bytes,
  label, index), so generated sets read back like any dataset.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
import pyarrow.parquet as pq

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IEND = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_pngs(images: np.ndarray, level: int = 6) -> list[bytes]:
    """(N, H, W, C) uint8 with C in {1, 3} -> N PNG files (8-bit grey or RGB)."""
    n, h, w, c = images.shape
    if c not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"PNG needs uint8 images with 1 or 3 channels, got {images.dtype} x {c}")
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0))
    # Every scanline starts with its filter byte (0 = none).
    rows = np.zeros((n, h, 1 + w * c), dtype=np.uint8)
    rows[:, :, 1:] = images.reshape(n, h, w * c)
    return [PNG_SIGNATURE + header + _chunk(b"IDAT", zlib.compress(rows[i].tobytes(), level)) + _IEND
            for i in range(n)]


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """An uncompressed .npz with a fixed timestamp: same arrays, same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, member.getvalue())
    return buffer.getvalue()


def parquet_bytes(images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> bytes:
    """One Parquet file in the prepared-dataset schema."""
    from .data import images_table

    table = images_table(images, labels, indices)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=2048)
    return sink.getvalue()
