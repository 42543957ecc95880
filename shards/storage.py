"""Where shard data and checkpoints live: a local directory, a shared mount or an object store.

Built on fsspec so that ``s3://bucket/prefix`` (s3fs; gcs://, abfs:// with their fsspec packages) works
like a path; ``storage_options`` go to the filesystem (for s3fs: ``key``, ``secret``,
``client_kwargs: {endpoint_url: ...}``, ``version_aware``). Every write is atomic: on a local filesystem
through a temp file, fsync and rename; on an object store a PUT (or a completed multipart upload) is
all-or-nothing, and files are never rewritten in place: names are content-addressed, and the manifest in
the local workdir switches to new names, which is the commit point.

Deleting on an object store removes the object; on a bucket with versioning the old version stays behind
unless the filesystem is version-aware (``version_aware: true``), in which case every version and delete
marker of the key is removed. `versioning_problem` says when a bucket would keep deleted rows.

Local files anywhere (the workdir's manifest and evaluation file too) are written with `write_atomic`
(or `atomic_path` for a file written in pieces) and removed with `zero_and_remove`: one implementation each.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import posixpath
import sys
import threading
import uuid
from contextlib import contextmanager

import fsspec
from fsspec.implementations.local import LocalFileSystem

from shards.errors import IntegrityError, WorkdirError

OWNER_FILE = "OWNER"
KEPT_PREFIX = "base/"  # the shared start, its base rows and the frozen encoder: trained or given once, never rebuilt


def _walk_files(path: str, rel: str, out: list[str]) -> None:
    """Append every file under the local directory ``path`` to ``out`` as ``rel`` + its relative path (what
    `os.walk` finds, without a `os.path.relpath` per file: a store's listing is on a deletion's path)."""
    try:
        entries = list(os.scandir(path))
    except OSError:  # as os.walk: a directory that cannot be listed is skipped
        return
    for e in entries:
        if not e.is_dir():
            out.append(rel + e.name)
        elif not e.is_symlink():  # as os.walk: a link to a directory is not followed
            _walk_files(e.path, rel + e.name + os.sep, out)


def _advice(rel: str) -> str:
    if rel.startswith(KEPT_PREFIX):
        return "it cannot be rebuilt: restore it from a backup or refit with `sisa train --overwrite`"
    return "run `sisa repair` to rebuild it from a clean checkpoint"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Storage:
    """A root URI plus atomic, digest-checked reads and writes of whole files under it."""

    def __init__(self, root: str, storage_options: dict | None = None):
        self.root = str(root).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self._base = fsspec.core.url_to_fs(self.root, **self.storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)
        self._deferred: list[str] | None = None  # local files written without fsync inside deferred_sync

    def __reduce__(self):
        return (Storage, (self.root, self.storage_options))

    @property
    def protocol(self) -> str:
        p = self.fs.protocol
        return p[0] if isinstance(p, (tuple, list)) else p

    def path(self, rel: str) -> str:
        return posixpath.join(self._base, rel) if not self.local else os.path.join(self._base, rel)

    def write(self, rel: str, data: bytes, durable: bool = True, digest: str | None = None) -> str:
        """Write ``data`` to ``rel`` atomically and return its sha256 (``digest``: the caller's, already
        computed for the content-addressed name). ``durable=False`` (local files) skips the fsyncs: the
        caller makes the file durable with `sync` before any commit names it."""
        target = self.path(rel)
        if self.local:
            durable = durable and self._deferred is None
            write_atomic(target, data, tmp_name=f".tmp-{uuid.uuid4().hex}", durable=durable)
            if not durable and self._deferred is not None:
                self._deferred.append(rel)
        else:
            self.fs.pipe_file(target, data)
        return digest or sha256(data)

    def sync(self, rels: list[str]) -> None:
        """Make files written with ``durable=False`` durable: one filesystem sync for all of them (an object
        store's PUT already is)."""
        paths = self.local_paths(rels)
        if paths:
            sync_paths(paths)

    def local_paths(self, rels: list[str]) -> list[str]:
        """The local paths that `sync` of ``rels`` makes durable (none on an object store)."""
        return [self.path(r) for r in rels] if self.local else []

    @contextmanager
    def deferred_sync(self):
        """Local writes inside skip their own fsyncs and are made durable together on leaving (also on an
        error): many small files (slices, stage checkpoints) then cost one sync, not two fsyncs each."""
        if not self.local or self._deferred is not None:
            yield
            return
        self._deferred = []
        try:
            yield
        finally:
            rels, self._deferred = self._deferred, None
            self.sync(rels)

    def read(self, rel: str, digest: str | None = None) -> bytes:
        """Read ``rel``; if ``digest`` is given, refuse content that does not match it."""
        try:
            if self.local:
                with open(self.path(rel), "rb") as f:
                    data = f.read()
            else:
                data = self.fs.cat_file(self.path(rel))
        except FileNotFoundError as e:
            raise IntegrityError(f"{self.describe(rel)} is missing; {_advice(rel)}", path=self.describe(rel)) from e
        if digest is not None and sha256(data) != digest:
            raise IntegrityError(
                f"{self.describe(rel)} is corrupt (sha256 does not match the manifest); it was not loaded. "
                f"{_advice(rel)[0].upper()}{_advice(rel)[1:]}",
                path=self.describe(rel),
            )
        return data

    def exists(self, rel: str) -> bool:
        if self.local:
            return os.path.exists(self.path(rel))
        self.fs.invalidate_cache(self.path(rel))  # other processes (Ray workers) write here too
        return self.fs.exists(self.path(rel))

    def delete(self, rel: str) -> None:
        """Remove a file; on a local disk overwrite it with zeros first so its bytes are not left in free blocks.

        On a version-aware S3 filesystem every version of the key is removed, not just the current one.
        """
        target = self.path(rel)
        if self.local:
            zero_and_remove(target)
        elif self._version_aware_s3():
            self._delete_all_versions(target)
        else:
            try:
                self.fs.rm_file(target)
            except FileNotFoundError:
                pass
            self.fs.invalidate_cache(target)

    def delete_many(self, rels: list[str], on_delete=None) -> None:
        """`delete` each of ``rels``; on a local disk every file is overwritten with zeros, the zeros made
        durable by one sync for all, and only then is any removed (``on_delete`` after each removal)."""
        if not self.local:
            for rel in rels:
                self.delete(rel)
                if on_delete:
                    on_delete()
            return
        zero_and_remove_many([self.path(r) for r in rels], on_delete)

    def listdir(self, rel: str = "") -> list[str]:
        """Every file under ``rel`` (recursively), as paths relative to the root."""
        base = self.path(rel)
        out = []
        if self.local:
            prefix = os.path.relpath(base, self._base)
            _walk_files(base, "" if prefix == os.curdir else prefix + os.sep, out)
        else:
            self.fs.invalidate_cache(base)  # listings are cached per process; workers wrote since
            if self.fs.exists(base):
                for p in self.fs.find(base):
                    out.append(posixpath.relpath(p, self._base))
        return sorted(out)

    def describe(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    # -- object-store specifics -------------------------------------------------------------------
    def claim(self, owner: str, label: str) -> None:
        """Mark this root as used by one workdir (``owner``: a stable token of it; ``label``: its path).

        Purging deletes every data/checkpoint file the workdir's manifest does not reference, so two
        workdirs sharing one root would delete each other's files: the second one is refused here, and so
        is a root that already holds data/ or ckpt/ files without an owner.
        Also the first contact with the store, so an unreachable or misconfigured store fails here.
        """
        try:
            if self.exists(OWNER_FILE):
                held = self.read(OWNER_FILE).decode(errors="replace").split("\n", 1)
                if held[0] != owner:
                    raise WorkdirError(
                        f"storage {self.root} is already used by another workdir ({held[1].strip() if len(held) > 1 else '?'}); "
                        "give every workdir its own storage.uri prefix (e.g. s3://bucket/<name>). If that workdir is "
                        f"gone for good, delete {self.describe(OWNER_FILE)} and its data/ and ckpt/ first",
                        path=self.root,
                    )
                return
            if self.listdir("data") or self.listdir("ckpt"):
                raise WorkdirError(
                    f"storage {self.root} already holds data/ or ckpt/ files that no sisa workdir owns; sisa purges "
                    "every file there that its manifest does not reference, so point storage.uri at an empty prefix",
                    path=self.root,
                )
            self.write(OWNER_FILE, f"{owner}\n{label}\n".encode())
            if self.read(OWNER_FILE).split(b"\n", 1)[0].decode(errors="replace") != owner:
                raise WorkdirError(
                    f"storage {self.root} was claimed by another workdir at the same moment; give every workdir "
                    "its own storage.uri prefix",
                    path=self.root,
                )
        except WorkdirError:
            raise
        except Exception as e:
            raise WorkdirError(
                f"cannot use storage {self.root}: {type(e).__name__}: {e}. Check storage.uri, that the bucket "
                "exists, and storage.options (e.g. client_kwargs.endpoint_url, key, secret) or the credentials "
                "in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)",
                path=self.root,
            ) from e

    def versioning_problem(self) -> str | None:
        """A warning when deleted objects would survive as old versions in a versioned bucket, else None."""
        if self.protocol not in ("s3", "s3a") or self._version_aware_s3():
            return None
        bucket = self._base.split("/", 1)[0]
        try:
            versioned = self.fs.is_bucket_versioned(bucket)
        except Exception:  # no s3:GetBucketVersioning permission: cannot tell
            return None
        if not versioned:
            return None
        return (
            f"bucket {bucket!r} has versioning enabled: objects sisa deletes (superseded slices holding deleted "
            "rows, superseded checkpoints) stay there as noncurrent versions. Set storage.options.version_aware: "
            "true so sisa deletes every version, or add a lifecycle rule expiring noncurrent versions "
            "(NoncurrentVersionExpiration) under this prefix"
        )

    def _version_aware_s3(self) -> bool:
        return not self.local and bool(getattr(self.fs, "version_aware", False)) and hasattr(self.fs, "call_s3")

    def _delete_all_versions(self, target: str) -> None:
        bucket, key = target.split("/", 1)
        doomed = []
        kwargs: dict = {}
        while True:
            out = self.fs.call_s3("list_object_versions", Bucket=bucket, Prefix=key, **kwargs)
            for v in out.get("Versions", []) + out.get("DeleteMarkers", []):
                if v["Key"] == key:
                    doomed.append(v["VersionId"])
            if not out.get("IsTruncated"):
                break
            kwargs = {"KeyMarker": out["NextKeyMarker"], "VersionIdMarker": out["NextVersionIdMarker"]}
        for vid in doomed:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, VersionId=vid)
        self.fs.invalidate_cache(target)


# -- local files: the one atomic write and the one zero-then-delete ------------------------------------
@contextmanager
def atomic_path(path, tmp_name: str | None = None, durable: bool = True):
    """A temp path next to ``path`` to write; on success it is fsynced and renamed over ``path`` (and the
    directory fsynced), on failure removed. ``tmp_name`` defaults to ``.NAME.tmp-PID-THREAD`` (what
    ``Workdir.remove_temp_files`` cleans up after a crash). ``durable=False``: renamed without the fsyncs
    (the caller calls `sync_paths` before a commit names the file)."""
    path = os.fspath(path)
    d = os.path.dirname(path) or "."
    if not os.path.isdir(d):  # a stat: cheaper than makedirs' failing mkdir where the directory exists
        os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, tmp_name or f".{os.path.basename(path)}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        zero_and_remove(tmp)
        raise
    if durable:
        _fsync_dir(d)


def write_atomic(path, data: bytes, tmp_name: str | None = None, durable: bool = True) -> None:
    """Write ``data`` to the local file ``path`` atomically: temp file, fsync, rename, fsync of the directory
    (``durable=False``: no fsyncs, see `atomic_path`)."""
    with atomic_path(path, tmp_name, durable) as tmp, open(tmp, "wb") as f:
        f.write(data)


def sync_paths(paths: list[str]) -> None:
    """Make local files, and their renames, durable: Linux's syncfs once per filesystem they are on
    (one journal commit for all), elsewhere an fsync of each file and each directory."""
    syncfs = getattr(_libc(), "syncfs", None)
    dirs = sorted({os.path.dirname(p) or "." for p in paths})
    if syncfs is None:
        for p in paths:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        for d in dirs:
            _fsync_dir(d)
        return
    done = set()
    for d in dirs:
        dev = os.stat(d).st_dev
        if dev in done:
            continue
        fd = os.open(d, os.O_RDONLY)
        try:
            if syncfs(fd) != 0:
                raise OSError(ctypes.get_errno(), f"syncfs of {d} failed")
        finally:
            os.close(fd)
        done.add(dev)


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    except OSError:
        return None


def zero_and_remove(path, chunk: int = 1 << 24) -> bool:
    """Overwrite a local file with zeros (fsynced), then remove it, so its bytes (rows, weights) are not left
    in free blocks. False when there was no such file."""
    try:
        if not _zero(path, chunk, fsync=True):
            return False
        os.remove(path)
    except FileNotFoundError:
        return False
    return True


def zero_and_remove_many(paths: list, on_remove=None, sync_also: list | tuple = ()) -> None:
    """`zero_and_remove` for many local files: all zeroed, the zeros made durable by one sync for all
    (`sync_paths`), and only then any removed (``on_remove`` after each removal). ``sync_also``: other local
    files that the same sync makes durable (a worker's new checkpoints, with the zeros of its row cache)."""
    zeroed = [p for p in paths if _zero(p)]
    if zeroed or sync_also:
        sync_paths([*sync_also, *zeroed])
    for p in zeroed:
        with contextlib.suppress(FileNotFoundError):
            os.remove(p)
        if on_remove:
            on_remove()


def _zero(path, chunk: int = 1 << 24, fsync: bool = False) -> bool:
    """Overwrite a local file with zeros (durable only with ``fsync``); False when there is no such file."""
    try:
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            for off in range(0, size, chunk):
                f.write(b"\0" * min(chunk, size - off))
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    except FileNotFoundError:
        return False
    return True


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
