"""Partitioning a Parquet dataset on the Ray cluster with Ray Data: the driver reads no rows.

The driver reads only the Parquet footers (`plan`): every file's columns are checked by `shards.parquet`
(a schema change between files, or a file that is not Parquet, is named) and each row group becomes one
unit with the dataset row number of its first row. Then one Ray Data pipeline:

1. ``from_items(units).map_batches(_place_unit)``: a worker reads its row group (`shards.parquet`), checks
   it (`shards.blocks.check_rows`, the rules of the single-process path) and gives every row its bucket
   (``shard * R + slice``, or `shards.blocks.EVAL` when held out), rank and dataset row number;
2. ``groupby("bucket").map_groups(_write_group)``: all rows of one slice meet in one worker (so equal ids
   always meet: duplicates are counted there), which sorts them into canonical order and writes the slice
   file to the store (`shards.blocks.sorted_bytes`: the bytes of the in-memory path). The held-out rows
   are one group, staged in the store under ``data/`` and copied into the workdir's evaluation file.

The driver collects one small record per slice. Ray retries a unit or group whose worker or node died;
slice names are content-addressed, so a retried write gives the same file. Errors of the data (a
`shards.errors.DataError` raised on a worker) reach the caller unwrapped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass

import fsspec
import numpy as np
import ray

from orchestration import pool
from shards import validation as check
from shards.blocks import EVAL, check_rows, make_group_rows, place_chunk, sorted_bytes
from shards.errors import DataError, IntegrityError, SisaError
from shards.ingest import Ingested
from shards.parquet import Columns, iter_chunks, open_parquet, parquet_files
from shards.rowcache import scratch_dir
from shards.schema import row_dtype
from shards.storage import Storage, atomic_path, sha256
from shards.store import write_encoded

EVAL_STAGE = "data/ingest-eval-{}.npy"  # held-out rows between the worker that groups them and the driver


@dataclass(frozen=True)
class IngestJob:
    """What every ingest worker needs (pickled into each task)."""

    source: str
    options: dict
    storage: Storage
    id_column: str
    label_column: str
    seed: int
    shards: int
    slices: int
    test_fraction: float
    kind: str
    features: int


def plan(source: str, options: dict, id_column: str, label_column: str) -> tuple[list[dict], Columns, str]:
    """The row-group units of ``source``, the first file's columns and the id kind, from footers alone."""
    fs, files = parquet_files(source, options)
    units: list[dict] = []
    first, kind, at = None, None, 0
    for path in files:
        pf = open_parquet(fs, path)
        cols = Columns(pf.schema_arrow, id_column, label_column, path)
        if first is None:
            first = cols
        else:
            first.check_same(cols, path)
        kind = check.check_id_kind(cols.id_kind, kind, at)
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if n:
                units.append({"path": path, "group": g, "first": at})
            at += n
    check.check_not_empty(at, source)
    return units, first, kind


def _place_unit(batch: dict, job: IngestJob) -> dict:
    """Read, check and place one row group (a batch of one unit)."""
    path, g, first = str(batch["path"][0]), int(batch["group"][0]), int(batch["first"][0])
    parts: dict[str, list] = {k: [] for k in ("bucket", "rank", "pos", "id", "y", "x")}
    stack = contextlib.ExitStack()
    try:
        scratch = stack.enter_context(scratch_dir())  # zeroed afterwards, or after a kill by the next cache
        fs = fsspec.core.url_to_fs(job.source, **job.options)[0]
        pf = open_parquet(fs, path)
        cols = Columns(pf.schema_arrow, job.id_column, job.label_column, path)
        for c in iter_chunks(pf, cols, [g], first, scratch):
            ids, y, _ = check_rows(c.ids, c.labels, c.X, c.first, job.kind, cols)
            bucket, rank = place_chunk(ids, job.seed, job.shards, job.slices, job.test_fraction)
            for k, v in zip(parts, (bucket, rank, c.first + np.arange(len(y)), ids, y, c.X)):
                parts[k].append(v)
    except SisaError:
        raise
    except Exception as e:  # a corrupt page, a truncated file, a lost object on the store
        raise DataError(
            f"{path} is not a readable Parquet file (row group {g}: {type(e).__name__}: {e})", path=path
        ) from None
    finally:
        stack.close()
    return {k: np.concatenate(v) for k, v in parts.items()}


def _write_group(batch: dict, job: IngestJob) -> dict:
    """Sort one slice's rows into canonical order and write its file (the held-out rows: stage them)."""
    b = int(batch["bucket"][0])
    ids = batch["id"]
    rows = make_group_rows(job.kind, ids, batch["y"], np.asarray(batch["x"], np.float32), (job.features,))
    rep_count, rep_sample = check.repeated_ids(rows["id"])
    if b == EVAL:
        data = sorted_bytes(rows, batch["pos"])  # source order, as the single-process path writes them
        name = EVAL_STAGE.format(sha256(data)[:12])
        entry = {"file": name, "sha256": job.storage.write(name, data), "rows": len(rows)}
        max_y = -1
    else:
        s, j = divmod(b, job.slices)
        entry = write_encoded(job.storage, s, j, sorted_bytes(rows, batch["rank"], batch["pos"]), len(rows))
        max_y = int(rows["y"].max())
    return {
        "bucket": np.array([b]),
        "entry": np.array([json.dumps(entry)]),
        "max_y": np.array([max_y]),
        "repeats": np.array([rep_count]),
        "sample": np.array([json.dumps(rep_sample)]),
    }


def ray_ingest(source: str, storage: Storage, *, seed: int, shards: int, slices: int, id_column: str = "id",
               label_column: str = "label", test_fraction: float = 0.0, eval_path: str | None = None,
               options: dict | None = None, num_cpus: float = 1.0) -> Ingested:  # fmt: skip
    """Partition ``source`` into ``storage`` on the Ray cluster this process is connected to. Raises
    DataError (naming the file or row) on bad data; slice files written before the error are left for the
    caller to purge (content-addressed, referenced by no manifest)."""
    options = dict(options or {})
    units, cols, kind = plan(source, options, id_column, label_column)
    F = len(cols.features)
    job = IngestJob(source, options, storage, id_column, label_column, seed, shards, slices, test_fraction, kind, F)
    pool.release_idle()  # idle shard workers would hold the CPUs the ingest tasks need
    ctx = ray.data.DataContext.get_current()
    raise_original = ctx.raise_original_map_exception
    ctx.raise_original_map_exception = True  # a worker's DataError reaches us as itself (and so the caller)
    try:
        ds = ray.data.from_items(units, override_num_blocks=len(units))
        ds = ds.map_batches(_place_unit, fn_kwargs={"job": job}, batch_size=1, batch_format="numpy", num_cpus=num_cpus)
        grouped = ds.groupby("bucket", num_partitions=max(1, min(len(units), shards * slices + 1)))
        out = grouped.map_groups(_write_group, fn_kwargs={"job": job}, batch_format="numpy", num_cpus=num_cpus)
        got = {int(r["bucket"]): r for r in out.take_all()}
    except Exception as e:
        cause = _sisa_cause(e)
        if cause is None:
            raise
        raise cause from None
    finally:
        ctx.raise_original_map_exception = raise_original
    return _collect(got, storage, job, cols, eval_path)


def _collect(got: dict, storage: Storage, job: IngestJob, cols: Columns, eval_path: str | None) -> Ingested:
    """Check the per-slice records, write empty slices, move the held-out rows to ``eval_path``."""
    S, R = job.shards, job.slices
    train = sum(int(json.loads(r["entry"])["rows"]) for b, r in got.items() if b != EVAL)
    check.check_row_count(train, S, R)
    check.check_unique(*[(int(r["repeats"]), json.loads(r["sample"])) for r in got.values()])
    empty = sorted_bytes(
        make_group_rows(job.kind, [], [], np.zeros((0, job.features), np.float32), (job.features,)), []
    )
    slices = [
        [
            json.loads(got[s * R + j]["entry"]) if s * R + j in got else write_encoded(storage, s, j, empty, 0)
            for j in range(R)
        ]
        for s in range(S)
    ]
    staged = json.loads(got[EVAL]["entry"]) if EVAL in got else None
    if eval_path is not None:
        write_eval_file(eval_path, storage, staged, job.kind, (job.features,))
    if staged is not None:
        storage.delete(staged["file"])
    max_label = max(int(r["max_y"]) for b, r in got.items() if b != EVAL)
    eval_rows = staged["rows"] if staged else 0
    return Ingested(slices, job.kind, [job.features], max_label, train, eval_rows, list(cols.features))


def write_eval_file(eval_path: str, storage: Storage, staged: dict | None, kind: str, feature_shape) -> None:
    """Copy the staged held-out rows to ``eval_path`` (atomically, digest-checked), or write an empty file."""
    with atomic_path(eval_path) as tmp, open(tmp, "wb") as out:
        if staged is None:
            np.save(out, np.zeros(0, row_dtype(kind, 1, feature_shape)), allow_pickle=False)
            return
        h = hashlib.sha256()
        with storage.fs.open(storage.path(staged["file"]), "rb") as src:
            while block := src.read(1 << 22):
                h.update(block)
                out.write(block)
        if h.hexdigest() != staged["sha256"]:
            raise IntegrityError(f"{storage.describe(staged['file'])} changed while it was copied", path=eval_path)


def _sisa_cause(e: BaseException) -> SisaError | None:
    """The SisaError a worker raised, from the exception Ray Data raised for it."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, SisaError):
            return e
        cause = getattr(e, "cause", None)
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None
