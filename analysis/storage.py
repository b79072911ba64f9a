"""Storage: every path the toolkit reads or writes is an `etils.epath.Path`, so a cloud URL (`gs://bucket/...`)
works wherever a local path does.

epath reads, writes, lists and removes on every backend; this module holds the few operations where a local disk
and an object store differ:
- `absolute`: a local path made absolute (orbax wants one); a URL already is (`Path.resolve()` would turn
  `gs://b/x` into a local folder named `gs:`).
- `atomic_writer`, `write_atomic`: a reader sees the old file or the new one, never half. Locally the bytes are
  written beside the file and renamed over it; an object store shows an object only once its upload has ended.
- `loadable`: what numpy loads from (a local path, so that mmap works; an object's bytes).
- `append_text`: object stores cannot append, so there the object is read and written again whole.
- `create_only`: writes a file only where none exists, atomically against another writer (a hard link locally,
  a generation-0 precondition on GCS).
- `GcsObject`: a GCS object with its generation, for compare-and-swap writes (the run lease on gs://).
Google Cloud Storage goes through gcsfs (epath's backend for gs://) and google-cloud-storage (for generations);
both honour STORAGE_EMULATOR_HOST, as tensorstore (orbax's checkpoints) honours TENSORSTORE_GCS_HTTP_URL.
"""

from __future__ import annotations

import contextlib
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


def is_url(path: str | os.PathLike) -> bool:
    """True for a cloud URL such as gs://bucket/x, False for a local path."""
    return bool(_URL.match(os.fspath(path)))


def absolute(path: str | os.PathLike) -> epath.Path:
    return epath.Path(path) if is_url(path) else epath.Path(os.path.abspath(path))


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[typing.BinaryIO]:
    """A binary file to write `path` through, so that a reader sees the old file or the new one, never half of
    one, and an exception inside the block leaves the old one in place."""
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
    try:
        with open(partial, "wb") as f:
            yield f
        os.replace(partial, path)
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


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append to a text file (an object store rewrites the object whole: it has no append)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_url(path):
        path.write_text((path.read_text() if path.exists() else "") + text)
    else:
        with open(path, "a") as f:
            f.write(text)


def create_only(path: str | os.PathLike, text: str) -> bool:
    """Write `path` only if it does not exist; False (writing nothing) when it does. Atomic against another
    writer: of two machines creating the same file at once, exactly one succeeds."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_url(path):
        return GcsObject(path).write(text, generation=0) is not None
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text)
    try:
        os.link(temporary, path)
        return True
    except FileExistsError:
        return False
    finally:
        temporary.unlink()


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
