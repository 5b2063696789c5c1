"""Reading files: IDX (MNIST), CIFAR-10's python pickles (numpy arrays only, nothing executable) and
single images (PIL), each failure a QatSteError naming the file."""

from __future__ import annotations

import gzip
import math
import pickle
import re
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QatSteError

__all__ = ["IMAGE_EXTENSIONS", "read_idx"]


_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    """Read a file, gunzipping it when it starts with the gzip signature."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise QatSteError(f"cannot read {path}: {error.strerror or error}", "check the path and permissions") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise QatSteError(
                f"{path} is a truncated or corrupt gzip file ({error})",
                "copy the file again from its source (compare its size and md5)",
            ) from None
    return raw


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Parse an IDX file (gzipped or raw) into a numpy array in native byte order.

    Header: two zero bytes, a type byte (0x08 = uint8, ...), a dimension count, then one big-endian
    uint32 per dimension. ``expected_magic`` (e.g. 0x803 for MNIST images, 0x801 for labels) is the
    first four bytes read as a big-endian integer.
    """
    path = Path(path)
    raw = _read_bytes(path)
    fix = "copy the file again from its source (compare its size and md5)"
    if len(raw) < 4:
        raise QatSteError(f"{path} is truncated: {len(raw)} bytes, too short for an IDX header", fix)
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise QatSteError(
            f"{path} has magic number 0x{magic:08x}, expected 0x{expected_magic:08x}",
            "check that this is the right IDX file (images start 0x00000803, labels 0x00000801) "
            "and that it is not corrupt",
        )
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise QatSteError(f"{path} is not an IDX file (magic number 0x{magic:08x})", fix)
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise QatSteError(f"{path} is truncated inside its IDX header", fix)
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    count = math.prod(dims)
    expected = header + count * dtype.itemsize
    if len(raw) < expected:
        raise QatSteError(
            f"{path} is truncated: {len(raw)} bytes, its header {tuple(dims)} needs {expected}", fix
        )
    if len(raw) > expected:
        raise QatSteError(
            f"{path} is corrupt: {len(raw) - expected} bytes after the data its header "
            f"{tuple(dims)} describes",
            fix,
        )
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)



class _RefusedPickle(pickle.UnpicklingError):
    """A data file asked to load something other than numpy arrays."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (what the CIFAR batches hold), nothing executable."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise _RefusedPickle(f"{module}.{name}")


def _load_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            content = _NumpyOnlyUnpickler(handle, encoding="bytes").load()
    except OSError as error:
        raise QatSteError(f"cannot read {path}: {error.strerror or error}", "check the path and permissions") from None
    except _RefusedPickle as error:
        raise QatSteError(
            f"{path} asks to load {error}, not only numpy arrays; refusing to unpickle it",
            "use the genuine CIFAR-10 python batches (cifar-10-python.tar.gz)",
        ) from None
    except Exception as error:  # noqa: BLE001 - truncated or corrupt pickles raise many different types
        raise QatSteError(
            f"{path} is not a readable CIFAR-10 batch (truncated or corrupt: {type(error).__name__}: {error})",
            "extract cifar-10-python.tar.gz again",
        ) from None
    if not isinstance(content, dict):
        raise QatSteError(f"{path} does not hold a CIFAR-10 batch dict", "extract cifar-10-python.tar.gz again")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in content.items()}



IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _read_image(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """One image as a uint8 C x H x W array; any file PIL cannot decode (damaged, not an image, or a
    decompression bomb, whether PIL warns or refuses) raises QatSteError naming it."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL warns at 1-2x its limit
            with Image.open(path) as opened:
                image = opened.convert(mode)
                if image.size != (size[1], size[0]):
                    image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
    except Exception as error:  # noqa: BLE001 - PIL's decoders raise many types (OSError, SyntaxError, TypeError)
        raise _read_error(path, error) from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _read_error(path: Path, error: Exception) -> QatSteError:
    """The error for an image file PIL could not decode (or refused as a decompression bomb)."""
    from PIL import Image

    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return _decompression_bomb(path, error)
    detail = str(error).strip() or type(error).__name__
    return QatSteError(f"cannot read image {path} ({detail[:300]})", "replace or delete the file")


def _decompression_bomb(path: Path, error: Exception) -> QatSteError:
    """The error for an image with more pixels than PIL's decompression-bomb limit."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    found = re.search(r"\((\d+) pixels\)", str(error))
    pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    limit_text = f"{int(limit):,} pixels" if limit else "its limit"
    return QatSteError(
        f"cannot read image {path}: it has {pixels}, more than PIL's decompression-bomb limit of {limit_text} "
        "(PIL.Image.MAX_IMAGE_PIXELS)",
        f"remove the file, or resize it to at most {limit_text}",
    )

