"""Byte-stable 8-bit grayscale PNG files, for data that must hash the same on every machine.

A PNG written by Pillow or OpenCV depends on the zlib build (its compressor may choose other
blocks), so the same pixels can give different bytes, and DVC then sees changed data. This
encoder stores the pixel rows in one uncompressed ("stored") deflate block and writes no
optional chunk (no time, no text), so its bytes depend on the pixels alone. Any PNG decoder
reads the files; for small images (the demo's 8x8 digits) they are barely larger than compressed.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_STORED_BLOCK = 0xFFFF  # one stored deflate block holds at most 65535 bytes


def encode_gray_png(pixels: np.ndarray) -> bytes:
    """The PNG bytes of a ``(height, width)`` uint8 image, the same on every machine.

    Args:
        pixels: A 2-D uint8 array (0 black .. 255 white).

    Returns:
        The bytes of an 8-bit grayscale, non-interlaced PNG.

    Raises:
        ValueError: ``pixels`` is not 2-D uint8, or too large for one stored block.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(
            f"Expected a 2-D uint8 image; received dtype {pixels.dtype}, shape {pixels.shape}."
        )
    height, width = pixels.shape
    # Each row is preceded by its filter type, 0 (none).
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels], axis=1).tobytes()
    if len(rows) > MAX_STORED_BLOCK:
        raise ValueError(f"An image of {height}x{width} is too large for one stored block.")
    deflate = (
        b"\x78\x01"  # zlib header: deflate, 32K window, no dictionary, fastest level
        + b"\x01"  # the final block, stored (uncompressed)
        + struct.pack("<HH", len(rows), len(rows) ^ 0xFFFF)
        + rows
        + struct.pack(">I", zlib.adler32(rows))
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8 bit, grayscale
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", deflate) + _chunk(b"IEND")


def write_gray_png(path: str | os.PathLike[str], pixels: np.ndarray) -> Path:
    """Write `encode_gray_png` of ``pixels`` to ``path`` (its folder must exist)."""
    path = Path(path)
    path.write_bytes(encode_gray_png(pixels))
    return path


def _chunk(kind: bytes, data: bytes = b"") -> bytes:
    """A PNG chunk: length, type, data and the CRC of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
