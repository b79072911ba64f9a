"""Storage: every path the toolkit reads or writes is an `etils.epath.Path`, so a cloud URL (`gs://bucket/...`)
works wherever a local path does.

epath reads, writes, lists and removes on every backend; this module holds the few operations where a local disk
and an object store differ:
- `absolute`: a local path made absolute (orbax wants one); a URL already is (`Path.resolve()` would turn
  `gs://b/x` into a local folder named `gs:`).
- `atomic_writer`, `write_atomic`: a reader sees the old file or the new one, never half. Locally the bytes are
  written beside the file and renamed over it; an object store shows an object only once its upload has ended.
- `loadable`: what numpy loads from (a local path, so that mmap works; an object's bytes).
- `read_range`: bytes [offset, offset + length) of a file: a positioned read locally, one ranged GET on an object
  store (no download of the rest, no read-ahead), so a reader holds only what it asked for.
- `append_text`: object stores cannot append, so there the object is read and written again whole; locally the
  text goes in whole or not at all (a failed write is cut back off).
- `sync`: a local file's data (and its directory entry) made durable; an object is once its upload returns.
- `create_only`: writes a file only where none exists, atomically against another writer (a hard link locally,
  a generation-0 precondition on GCS).
- `GcsObject`: a GCS object with its generation, for compare-and-swap writes (the run lease on gs://).
A write that finds no space left raises `DiskFull`, naming the path, what the write needed and what is free;
commands exit with DISK_FULL_EXIT_CODE on it, and the same command continues once there is space.
Google Cloud Storage goes through gcsfs (epath's backend for gs://) and google-cloud-storage (for generations);
both honour STORAGE_EMULATOR_HOST, as tensorstore (orbax's checkpoints) honours TENSORSTORE_GCS_HTTP_URL.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import re
import typing
from collections.abc import Iterator

import fsspec
from etils import epath

# No listing cache for cloud paths: a process here reads what others write (grid workers, other hosts, other
# slices), and a cached listing would hide their files.
for _protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(_protocol, {})["use_listings_cache"] = False

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
DISK_FULL_EXIT_CODE = 74  # EX_IOERR (sysexits.h): a write failed for lack of space
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")  # how libraries (tensorstore) word ENOSPC


class DiskFull(OSError):
    """A write found no space left on its device (or the user's quota spent): the message names the path, the
    space the write needed (where known; `at_least`: what it had written when space ran out) and the space free;
    nothing already written is damaged."""

    def __init__(self, path: str | os.PathLike, needed: int | None = None, *, at_least: bool = False):
        free = free_bytes(path)
        amounts = ", ".join(part for part in (
            None if needed is None else f"the write needed {'at least ' if at_least else ''}{format_bytes(needed)}",
            None if free is None else f"{format_bytes(free)} free") if part)
        super().__init__(errno.ENOSPC, f"No space left on the device of {path}" + (f" ({amounts})" if amounts else "")
                         + ". Free some space (or move the directory elsewhere) and run the same command again.")
        self.path, self.needed, self.free = os.fspath(path), needed, free

    def __str__(self) -> str:
        return self.strerror


def format_bytes(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free to this user on the device of `path` (or of its nearest existing parent); None for a URL."""
    if is_url(path):
        return None
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def is_no_space(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, is a lack of space (ENOSPC, EDQUOT), however a library
    wrapped it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_SPACE_ERRNOS:
            return True
        if any(text in str(error) for text in _NO_SPACE_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def raising_disk_full(path: str | os.PathLike, needed: int | None = None) -> Iterator[None]:
    """Turn a lack of space inside the block into DiskFull naming `path` (a DiskFull already raised passes)."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if is_no_space(e):
            raise DiskFull(path, needed) from None
        raise


def is_url(path: str | os.PathLike) -> bool:
    """True for a cloud URL such as gs://bucket/x, False for a local path."""
    return bool(_URL.match(os.fspath(path)))


def absolute(path: str | os.PathLike) -> epath.Path:
    return epath.Path(path) if is_url(path) else epath.Path(os.path.abspath(path))


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[typing.BinaryIO]:
    """A binary file to write `path` through, so that a reader sees the old file or the new one, never half of
    one, and an exception inside the block leaves the old one in place (a lack of space raises DiskFull)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_url(path):
        f = path.open("wb")
        try:
            yield f
        except BaseException:
            f.discard()  # fsspec's buffered file: the object is never created
            raise
        f.close()
        return
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    written = None
    try:
        with open(partial, "wb") as f:
            try:
                yield f
            finally:
                written = f.tell()
        os.replace(partial, path)
    except OSError as e:
        if is_no_space(e) and not isinstance(e, DiskFull):
            raise DiskFull(path, written, at_least=True) from None
        raise
    finally:
        partial.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace a text file atomically (see `atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(text.encode())


def loadable(path: str | os.PathLike) -> epath.Path | io.BytesIO:
    """What numpy can load `path` from: the local path itself (so that mmap_mode works), or an object's bytes."""
    path = epath.Path(path)
    return io.BytesIO(path.read_bytes()) if is_url(path) else path


def read_range(path: str | os.PathLike, offset: int, length: int) -> bytes:
    """`length` bytes of a file from `offset` (see the module docstring); fewer where the file ends before."""
    if is_url(path):
        filesystem, name = fsspec.core.url_to_fs(os.fspath(path))
        return filesystem.cat_file(name, start=offset, end=offset + length)
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append to a text file, whole or not at all: locally the bytes go in with single writes at the end and a
    failed append (no space, an interrupt) is cut back to the previous size, so no torn line is ever left. An
    object store rewrites the object whole (it has no append)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode()
    if is_url(path):
        path.write_bytes((path.read_bytes() if path.exists() else b"") + data)
        return
    with raising_disk_full(path, len(data)):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):  # a write to a regular file is short only when space runs out midway
                written += os.write(fd, data[written:])
        except BaseException as e:
            os.ftruncate(fd, size)
            if isinstance(e, OSError) and is_no_space(e):
                raise DiskFull(path, len(data)) from None
            raise
    finally:
        os.close(fd)


def sync(path: str | os.PathLike) -> None:
    """Make a local file's data and its directory entry durable (fsync): a host crash after this loses neither.
    An object on a store is durable once its write returns; a file that does not exist is skipped."""
    if is_url(path) or not os.path.exists(path):
        return
    for target in (path, os.path.dirname(os.path.abspath(path))):
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def create_only(path: str | os.PathLike, text: str) -> bool:
    """Write `path` only if it does not exist; False (writing nothing) when it does. Atomic against another
    writer: of two machines creating the same file at once, exactly one succeeds."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_url(path):
        return GcsObject(path).write(text, generation=0) is not None
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        with raising_disk_full(path, len(text.encode())):
            temporary.write_text(text)
        os.link(temporary, path)
        return True
    except FileExistsError:
        return False
    finally:
        temporary.unlink(missing_ok=True)


@functools.cache
def _gcs_client():
    from google.cloud import storage  # only where a gs:// path needs generations

    return storage.Client()


class GcsObject:
    """One GCS object, read and written with generation preconditions (GCS's compare-and-swap)."""

    def __init__(self, path: str | os.PathLike):
        match = re.match(r"^gs://([^/]+)/(.+)$", os.fspath(path))
        if not match:
            raise ValueError(f"{path} is not a gs://bucket/object URL.")
        self._blob = _gcs_client().bucket(match.group(1)).blob(match.group(2))

    def read(self) -> tuple[str, int] | None:
        """The object's text and the generation it is of, or None when it does not exist."""
        from google.api_core import exceptions

        while True:
            try:
                self._blob.reload()
                generation = int(self._blob.generation)
                return self._blob.download_as_text(if_generation_match=generation), generation
            except exceptions.NotFound:
                return None
            except exceptions.PreconditionFailed:  # rewritten between the two requests: read it again
                continue

    def write(self, text: str, *, generation: int) -> int | None:
        """Write only if the object's generation is `generation` (0: only if it does not exist). Returns the new
        generation, or None when another writer got there first."""
        from google.api_core import exceptions

        try:
            self._blob.upload_from_string(text, if_generation_match=generation)
        except exceptions.PreconditionFailed:
            return None
        return int(self._blob.generation)

    def delete(self, *, generation: int) -> bool:
        from google.api_core import exceptions

        try:
            self._blob.delete(if_generation_match=generation)
        except (exceptions.PreconditionFailed, exceptions.NotFound):
            return False
        return True
