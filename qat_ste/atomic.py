"""Atomic file writes: a temporary file in the same folder, fsync, then ``os.replace``.

A crash or an error while writing leaves the previous file (or no file) in place, never a partial one.
A full disk is reported as a QatSteError naming the file and the free space. Files written with
:func:`atomic_save` carry a sha256 digest of their bytes (in the zip comment, which torch ignores),
so :func:`check_integrity` detects damage anywhere in them, not only in the tensor data.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import uuid
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import QatSteError

#: temporary files of :func:`atomic_write`: ``.<name>.<pid>.<8 hex>.tmp``
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<tag>[0-9a-f]{8})\.tmp$")
#: the staging folder of a write of several files (export_onnx's model and its external data file)
_TEMP_FOLDER = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<tag>[0-9a-f]{8})\.tmpdir$")
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], Any]) -> Path:
    """Write ``path`` through ``write(stream)`` atomically; returns the path.

    On a full disk (or quota) raises QatSteError saying so; the temporary file is always removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_name = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        # mode 0o666 lets the umask decide the permissions, as for an ordinary file
        handle = os.open(temp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as error:
        if _is_disk_full(error, path.parent):
            raise _disk_full_error(path) from None
        raise
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException as error:
        full = _is_disk_full(error, path.parent)
        try:
            os.unlink(temp_name)
        except OSError:
            pass
        if full:
            raise _disk_full_error(path) from None
        raise
    return path


def _is_disk_full(error: BaseException | None, folder: Path) -> bool:
    """Whether ``error`` (or one it was raised from or while handling) is ENOSPC/EDQUOT (torch's zip
    writer hides it behind a RuntimeError; :func:`atomic_save` re-raises the OSError it kept)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        error = error.__cause__ or error.__context__
    return False


def _disk_full_error(path: Path) -> QatSteError:
    free = _free_bytes(path.parent)
    kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
    return QatSteError(
        f"no space left on device while writing {path} ({'unknown' if free is None else f'{free:,}'} bytes free); "
        f"{kept}",
        "free space on that device, or choose another --out (out_dir) on a device with room",
    )


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary file of :func:`atomic_write` (``.<name>.<pid>.<hex>.tmp``)."""
    return _TEMP_NAME.match(name) is not None


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (``.<name>.<pid>.<hex>.tmp``) and staging folders (``....tmpdir``)
    that interrupted atomic writes left in ``folder``, whose process is gone or is this process;
    returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        is_file = entry.is_file() and not entry.is_symlink()
        is_folder = entry.is_dir() and not entry.is_symlink()
        match = _TEMP_NAME.match(entry.name) if is_file else _TEMP_FOLDER.match(entry.name) if is_folder else None
        if match is None:
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _process_alive(pid):
            continue  # another process may be writing it right now
        try:
            shutil.rmtree(entry) if is_folder else entry.unlink()
        except OSError:  # gone meanwhile, or not ours to delete
            continue
        removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows: keep its files
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, as another user
        return True
    return True


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda stream: stream.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
    """A JSON-ready copy: non-finite floats become None, tensors/arrays lists, paths strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars/arrays, torch tensors
        return json_safe(value.tolist())
    return value


def atomic_write_json(path: str | os.PathLike, value: Any) -> Path:
    """Write ``value`` as indented JSON to ``path`` atomically (non-finite floats become null)."""
    return atomic_write_text(path, json.dumps(json_safe(value), indent=2, default=str) + "\n")


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically, with a sha256 digest of the file in its zip comment."""
    return atomic_write(path, lambda stream: _save_with_digest(obj, stream))


# ---- integrity of torch files ---------------------------------------------------------------

_EOCD = b"PK\x05\x06"  # zip end-of-central-directory record (22 bytes + comment)
_DIGEST_PREFIX = b"qat_ste sha256 "
_DIGEST_COMMENT_LEN = len(_DIGEST_PREFIX) + 64


class _HashingWriter:
    """Forwards writes to ``stream`` and hashes them. Keeps the first OSError, which torch's zip
    writer turns into an uninformative RuntimeError."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.sha = hashlib.sha256()
        self.tail = b""
        self.count = 0
        self.error: OSError | None = None

    def __getattr__(self, name: str) -> Any:  # seek, tell, ... of the real stream
        return getattr(self.stream, name)

    def write(self, data: Any) -> int:
        try:
            written = self.stream.write(data)
        except OSError as error:
            self.error = self.error or error
            raise
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.tail = (self.tail + bytes(view[-22:]))[-22:]
        self.count += len(view)
        return written

    def flush(self) -> None:
        self.stream.flush()


def _save_with_digest(obj: Any, stream: Any) -> None:
    import torch

    writer = _HashingWriter(stream)
    try:
        torch.save(obj, writer)
    except RuntimeError:
        if writer.error is not None:
            raise writer.error from None
        raise
    if writer.tail[:4] != _EOCD or writer.tail[-2:] != b"\0\0" or stream.tell() != writer.count:
        return  # not one sequential zip (another torch format, or the writer seeked): the zip CRCs still apply
    comment = _DIGEST_PREFIX + writer.sha.hexdigest().encode("ascii")
    stream.seek(-2, io.SEEK_CUR)
    stream.write(len(comment).to_bytes(2, "little") + comment)


def check_integrity(path: str | os.PathLike) -> str | None:
    """None when the zip file at ``path`` (a torch checkpoint) is intact, else what is damaged.

    Checks the sha256 digest :func:`atomic_save` stores, else every member's CRC. A file that
    does not look like a zip at all is left to the reader (None)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(4)
        handle.seek(max(0, size - 22 - _DIGEST_COMMENT_LEN))
        tail = handle.read()
    plain = tail[-22:-18] == _EOCD and tail[-2:] == b"\0\0"
    digest = _stored_digest(tail)
    if not plain and digest is None:
        if head != b"PK\x03\x04":
            return None  # not a zip file: the torch reader says what it is
        # torch writes no zip comment, and atomic_save only its digest: anything else at the end is damage
        return "its zip end record is missing or damaged (truncated, or bytes changed at the end)"
    if digest is not None and _file_sha256(path, size - _DIGEST_COMMENT_LEN - 2) == digest:
        return None
    member = _crc_failure(path)
    if member is not None:
        return member
    if digest is not None:
        return "its bytes differ from the sha256 digest stored in it (damage in the zip headers or directory)"
    return None


def _stored_digest(tail: bytes) -> str | None:
    record = tail[-(22 + _DIGEST_COMMENT_LEN):]
    length = _DIGEST_COMMENT_LEN.to_bytes(2, "little")
    if (len(record) != 22 + _DIGEST_COMMENT_LEN or record[:4] != _EOCD or record[20:22] != length
            or not record[22:].startswith(_DIGEST_PREFIX)):
        return None
    text = record[22 + len(_DIGEST_PREFIX):].decode("ascii", errors="replace")
    return text if re.fullmatch(r"[0-9a-f]{64}", text) else None


def _file_sha256(path: Path, length: int) -> str:
    """sha256 of the first ``length`` bytes followed by a zero comment length (the file as torch wrote it)."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        left = length
        while left > 0:
            chunk = handle.read(min(left, 1 << 22))
            if not chunk:
                break
            sha.update(chunk)
            left -= len(chunk)
    sha.update(b"\0\0")
    return sha.hexdigest()


def _crc_failure(path: Path) -> str | None:
    """Read every member, checking its CRC and header; None if all are intact, else what failed."""
    member = "?"
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                member = info.filename
                with archive.open(info) as stream:
                    while stream.read(1 << 22):
                        pass
    except zipfile.BadZipFile as error:
        if "CRC" in str(error):
            return f"CRC mismatch in member {member}"
        return f"damaged zip header of member {member!r} ({str(error).strip()[:200]})"
    except Exception as error:  # noqa: BLE001 - a damaged directory raises many types (RuntimeError, ...)
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        return f"its zip directory cannot be read ({type(error).__name__}: {first})"
    return None


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda stream: fig.savefig(stream, format="png", dpi=dpi))
    finally:
        plt.close(fig)
