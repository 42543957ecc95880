"""`SisaEnsemble.fit`: validate, partition and store the data, train every shard, commit the manifest.

Nothing is left half-written: the manifest is written last, and on any failure the files this call
created are removed again.
"""

from __future__ import annotations

import io
import time

import numpy as np

from orchestration import ShardPlan
from shards.errors import DataError, WorkdirError
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
    X, y, ids, kind, eval_set = load_arrays(ens, X, y, ids, eval_set)
    num_classes = int(c.model.kwargs.get("num_classes", 0)) or int(y.max()) + 1
    if y.max() >= num_classes:
        raise DataError(f"labels go up to {int(y.max())} but model.kwargs.num_classes is {num_classes}")
    wd = ens.workdir
    with wd.lock(what="fit"):
        if wd.exists() and not overwrite:
            raise WorkdirError(
                f"{wd.path} already holds a trained ensemble; open it with SisaEnsemble.open(), "
                "pick a new workdir, or pass overwrite=True (--overwrite) to replace it"
            )
        storage = ens.storage()
        manifest = {
            "format": MANIFEST_FORMAT,
            "config_hash": c.config_hash(),
            "training_hash": c.training_hash(),
            "id_kind": kind,
            "input_shape": list(X.shape[1:]),
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
            _write_eval(wd.path / "eval.npy", eval_set)
            slices = write_partition(storage, ids, X, y, kind, c.seed, c.sharding.shards, c.sharding.slices)
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
    for name in ("config.yaml", "eval.npy"):
        p = ens.workdir.path / name
        if p.exists():
            p.unlink()
