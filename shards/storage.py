"""Where shard data and checkpoints live: a local directory, a shared mount or an object store.

Built on fsspec so that ``s3://bucket/prefix`` works like a path. Every write is atomic: on a local
filesystem through a temp file, fsync and rename; on an object store a PUT is already all-or-nothing,
and the files are never rewritten in place (new names, then the manifest switches to them).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from shards.errors import IntegrityError


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Storage:
    """A root URI plus atomic, digest-checked reads and writes of whole files under it."""

    def __init__(self, root: str, storage_options: dict | None = None):
        self.root = str(root).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self._base = fsspec.core.url_to_fs(self.root, **self.storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)

    def __reduce__(self):
        return (Storage, (self.root, self.storage_options))

    def path(self, rel: str) -> str:
        return posixpath.join(self._base, rel) if not self.local else os.path.join(self._base, rel)

    def write(self, rel: str, data: bytes) -> str:
        """Write ``data`` to ``rel`` atomically and return its sha256."""
        target = self.path(rel)
        if self.local:
            d = os.path.dirname(target)
            os.makedirs(d, exist_ok=True)
            tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            _fsync_dir(d)
        else:
            self.fs.pipe_file(target, data)
        return sha256(data)

    def read(self, rel: str, digest: str | None = None) -> bytes:
        """Read ``rel``; if ``digest`` is given, refuse content that does not match it."""
        try:
            if self.local:
                with open(self.path(rel), "rb") as f:
                    data = f.read()
            else:
                data = self.fs.cat_file(self.path(rel))
        except FileNotFoundError as e:
            raise IntegrityError(
                f"{self.describe(rel)} is missing; run `sisa repair` to rebuild it from a clean checkpoint",
                path=self.describe(rel),
            ) from e
        if digest is not None and sha256(data) != digest:
            raise IntegrityError(
                f"{self.describe(rel)} is corrupt (sha256 does not match the manifest); it was not loaded. "
                "Run `sisa repair` to rebuild it from a clean checkpoint",
                path=self.describe(rel),
            )
        return data

    def exists(self, rel: str) -> bool:
        return os.path.exists(self.path(rel)) if self.local else self.fs.exists(self.path(rel))

    def delete(self, rel: str) -> None:
        """Remove a file; on a local disk overwrite it with zeros first so its bytes are not left in free blocks."""
        target = self.path(rel)
        if self.local:
            try:
                size = os.path.getsize(target)
                with open(target, "r+b") as f:
                    f.write(b"\0" * size)
                    f.flush()
                    os.fsync(f.fileno())
                os.remove(target)
            except FileNotFoundError:
                pass
        elif self.fs.exists(target):
            self.fs.rm_file(target)

    def listdir(self, rel: str = "") -> list[str]:
        """Every file under ``rel`` (recursively), as paths relative to the root."""
        base = self.path(rel)
        out = []
        if self.local:
            for dirpath, _, files in os.walk(base):
                for name in files:
                    out.append(os.path.relpath(os.path.join(dirpath, name), self._base))
        elif self.fs.exists(base):
            for p in self.fs.find(base):
                out.append(posixpath.relpath(p, self._base))
        return sorted(out)

    def describe(self, rel: str) -> str:
        return f"{self.root}/{rel}"


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
