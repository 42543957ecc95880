"""`SisaEnsemble.fit`: validate, partition and store the data, train every shard, commit the manifest.

Nothing is left half-written: the manifest is written last, and on any failure the files this call
created are removed again.
"""

from __future__ import annotations

import hmac
import io
import os
import time
import warnings

import numpy as np

from orchestration import ShardPlan
from shards.errors import ConfigError, DataError, WorkdirError
from shards.ingest import ingest_parquet, wipe_stale_spills
from shards.store import write_partition
from sisa import data as datamod
from sisa.workdir import MANIFEST_FORMAT, purge_unreferenced, write_atomic


def load_arrays(ens, X, y, ids, eval_set):
    c = ens.config
    if X is None:
        src = c.data.source
        if src == "arrays":
            raise DataError(
                "no data: pass fit(X, y, ids=...) or set data.source in the config (digits, synthetic, npz, csv, parquet)"
            )
        if src in ("digits", "synthetic"):
            X, y, ids = datamod.builtin(src, c.data)
        else:
            X, y, ids = datamod.from_file(ens.resolve_data_path(c.data.path), c.data.id_column, c.data.label_column)
        X, y, ids, kind = datamod.check_training(X, y, ids, 1, 1)
        (X, y, ids), eval_set = datamod.split_holdout(X, y, ids, c.seed, c.data.test_fraction)
    elif y is None:
        raise DataError("fit(X) needs labels: call fit(X, y, ids=...)")
    X, y, ids, kind = datamod.check_training(X, y, ids, c.sharding.shards, c.sharding.slices)
    if eval_set is not None:
        ex = datamod.check_features(eval_set[0], X.shape[1:])
        ey = np.asarray(eval_set[1]).astype(np.int64)
        if len(ey) != len(ex):
            raise DataError(f"eval_set has {len(ex)} rows but {len(ey)} labels")
        eval_set = (ex, ey)
    return X, y, ids, kind, eval_set


def fit(ens, X, y, ids, eval_set, overwrite: bool, progress) -> None:
    c = ens.config
    _check_gpus(ens)
    parquet = datamod.parquet_source(X, y, ids, eval_set, c.data, ens.resolve_data_path)
    if parquet is None:
        X, y, ids, kind, eval_set = load_arrays(ens, X, y, ids, eval_set)
        num_classes = _num_classes(c, int(y.max()))
        input_shape = list(X.shape[1:])
    wd = ens.workdir
    with wd.lock(what="fit"):
        if wd.exists() and not overwrite:
            raise WorkdirError(
                f"{wd.path} already holds a trained ensemble; open it with SisaEnsemble.open(), "
                "pick a new workdir, or pass overwrite=True (--overwrite) to replace it"
            )
        storage = ens.storage()
        _claim(ens, storage)
        if parquet is not None:  # out of core: partitioned into the store before anything else changes
            ingested, num_classes, eval_tmp = _ingest(ens, storage, parquet)
            kind, input_shape = ingested.id_kind, ingested.input_shape
        manifest = {
            "format": MANIFEST_FORMAT,
            "config_hash": c.config_hash(),
            "training_hash": c.training_hash(),
            "id_kind": kind,
            "input_shape": input_shape,
            "num_classes": num_classes,
            "storage": storage.root,
            "shards": [],
            "applied_requests": [],
            "created": time.time(),
        }
        if wd.exists():
            ens._manifest = None
            wd.manifest_path.unlink()
        try:
            ens.write_config()
            wd.secret()
            if parquet is None:
                _write_eval(wd.path / "eval.npy", eval_set)
                slices = write_partition(storage, ids, X, y, kind, c.seed, c.sharding.shards, c.sharding.slices)
            else:
                os.replace(eval_tmp, wd.path / "eval.npy")
                slices = ingested.slices
            manifest["shards"] = [{"slices": sl, "checkpoints": [], "excluded": False} for sl in slices]
            t0 = time.time()
            with ens.tracker().operation("fit", manifest) as run:
                plans = [ShardPlan(shard=s, start_stage=1, slices=sl) for s, sl in enumerate(slices)]
                ens.run_plans(manifest, plans, _callbacks(progress, run))
                for p in plans:
                    manifest["shards"][p.shard]["checkpoints"] = p.checkpoints
                ens.commit(manifest)
                manifest["metrics"] = ens.evaluate(manifest)
                manifest["metrics"]["fit_seconds"] = time.time() - t0
                ens.commit(manifest)
                run.finish(ens, plans, manifest["metrics"])
                run.log_ensemble(ens)  # the first version of the ensemble as a registered pyfunc model
            purge_unreferenced(storage, manifest)
        except BaseException:
            if not wd.exists():
                _remove_partial(ens, storage)
            raise
    ens.last_fit_metrics = manifest["metrics"]


def _check_gpus(ens) -> None:
    """In-process training runs in this process: with resources.num_gpus it needs a GPU here (on Ray, the
    workers' nodes need one, and Ray only places shards where the GPUs are)."""
    if ens.config.resources.num_gpus > 0 and ens._executor_name == "inprocess":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"resources.num_gpus is {ens.config.resources.num_gpus} but this process sees no CUDA GPU and the "
                "executor is inprocess; set resources.num_gpus: 0, or use the ray executor on a cluster with GPUs",
                problems=["resources.num_gpus: no GPU for the inprocess executor"],
            )


def _num_classes(c, max_label: int) -> int:
    num_classes = int(c.model.kwargs.get("num_classes", 0)) or max_label + 1
    if max_label >= num_classes:
        raise DataError(f"labels go up to {max_label} but model.kwargs.num_classes is {num_classes}")
    return num_classes


def _claim(ens, storage) -> None:
    """A store outside the workdir (object store, shared mount) belongs to one workdir: purging would delete
    another's files. Warn on a versioned bucket, which would keep deleted rows as old versions."""
    wd = ens.workdir
    if storage.local and not storage.root.startswith("file://"):  # the default: a store inside the workdir
        return
    storage.claim(hmac.new(wd.secret(), b"sisa-storage-owner", "sha256").hexdigest()[:32], str(wd.path))
    problem = storage.versioning_problem()
    if problem:
        warnings.warn(problem, stacklevel=4)


def _ingest(ens, storage, source: str):
    """Partition a Parquet dataset out of core. On bad data, remove what it wrote; nothing else changes."""
    c = ens.config
    wd = ens.workdir
    eval_tmp = wd.path / ".eval-ingest.npy"
    wipe_stale_spills(wd.path)  # of a fit that was killed here (we hold the workdir lock)
    data_protocol = source.split("://", 1)[0] if "://" in source else "file"
    options = dict(c.storage.options) if data_protocol == storage.protocol and not storage.local else {}
    try:
        ing = ingest_parquet(
            source,
            storage,
            seed=c.seed,
            shards=c.sharding.shards,
            slices=c.sharding.slices,
            id_column=c.data.id_column,
            label_column=c.data.label_column,
            test_fraction=c.data.test_fraction,
            eval_path=str(eval_tmp),
            spill_dir=os.environ.get("SISA_SPILL_DIR") or str(wd.path),
            options=options,
        )
        return ing, _num_classes(c, ing.max_label), eval_tmp
    except BaseException:
        purge_unreferenced(storage, wd.read_manifest() if wd.exists() else {"shards": []})
        if eval_tmp.exists():
            eval_tmp.unlink()
        raise


def _callbacks(progress, run):
    def on_stage(plan, entry, metrics):
        run.stage(plan.shard, metrics)
        if progress:
            progress(plan, entry, metrics)

    return on_stage


def _write_eval(path, eval_set) -> None:
    if eval_set is None:
        if path.exists():
            path.unlink()
        return
    X, y = eval_set
    rows = np.zeros(len(y), dtype=[("y", np.int64), ("x", np.float32, X.shape[1:])])
    rows["y"], rows["x"] = y, X
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    write_atomic(path, buf.getvalue())


def _remove_partial(ens, storage) -> None:
    purge_unreferenced(storage, {"shards": []})
    for name in ("config.yaml", "eval.npy", ".eval-ingest.npy"):
        p = ens.workdir.path / name
        if p.exists():
            p.unlink()
