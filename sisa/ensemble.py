"""`SisaEnsemble`: fit, predict, reopen and delete, the sklearn way (fit returns self)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import torch

from orchestration import InProcessExecutor, RayExecutor, ShardPlan
from shards import training
from shards.errors import DataError, NotFittedError, WorkdirError
from shards.ids import canonical_ids, is_scalar_id
from shards.partition import shard_of as _shard_of
from shards.spec import TrainSpec
from sisa import data as datamod
from sisa import evalfile
from sisa.aggregate import Aggregator, decide
from sisa.config import SisaConfig, dump_yaml, load_config
from sisa.workdir import MANIFEST_FORMAT, Workdir, purge_unreferenced, write_atomic

DEFAULT_WAIT_TIMEOUT = 60.0  # seconds predict waits while a deletion retrains every active shard


class SisaEnsemble:
    """A sharded, sliced ensemble that can forget rows exactly.

    >>> ens = SisaEnsemble.from_config("configs/digits.yaml", workdir="runs/digits").fit()
    >>> ens.predict(X_test)
    """

    def __init__(
        self,
        config,
        workdir,
        executor: str | None = None,
        tracking_uri: str | None = None,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    ):
        """``wait_timeout``: how long `predict` waits, in seconds, when every shard is being retrained by a
        deletion (see `aggregator`) before it raises `RetrainingError`; 0 never waits."""
        self.config: SisaConfig = load_config(config)
        self.wait_timeout = float(wait_timeout)
        self.workdir = Workdir(workdir)
        self._executor_name = executor or self.config.cluster.executor
        self._executor = None
        self._tracking_uri = tracking_uri
        self._manifest: dict | None = None
        self._manifest_sig: tuple | None = None
        self._agg: Aggregator | None = None
        self._models: dict[tuple[int, str], torch.nn.Module] = {}  # (shard, checkpoint sha256) -> sub-model
        self._state_lock = threading.RLock()
        self.last_fit_metrics: dict = {}

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config, workdir, **kwargs) -> SisaEnsemble:
        """``config``: a YAML path, a dict or a SisaConfig."""
        return cls(config, workdir, **kwargs)

    @classmethod
    def open(
        cls,
        workdir,
        executor: str | None = None,
        tracking_uri: str | None = None,
        recover: bool = True,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    ) -> SisaEnsemble:
        """Reopen a trained workdir. Unfinished deletions are finished before anything is served, except one
        that another process is running right now: that process finishes it, and until then its shards are
        excluded from prediction (``wait_timeout``: see `__init__`)."""
        wd = Workdir(workdir)
        manifest = wd.read_manifest()
        if manifest.get("format") != MANIFEST_FORMAT:
            raise WorkdirError(
                f"{wd.path} was written by an incompatible sisa (manifest format {manifest.get('format')})"
            )
        ens = cls(
            wd.path / "config.yaml", wd.path, executor=executor, tracking_uri=tracking_uri, wait_timeout=wait_timeout
        )
        if ens.config.training_hash() != manifest["training_hash"]:
            raise WorkdirError(
                f"{wd.path}/config.yaml does not match the config the ensemble was trained with "
                f"(hash {ens.config.training_hash()} != {manifest['training_hash']}); restore it or train a new workdir"
            )
        ens._manifest = manifest
        ens._manifest_sig = ens._disk_sig()
        if recover:
            from sisa.ops.delete import recover as _recover

            _recover(ens, wait=False)
        return ens

    # -- plumbing shared with deletion --------------------------------------------------------
    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            if self.workdir.exists():
                raise NotFittedError(
                    f"this SisaEnsemble is not fitted, but {self.workdir.path} holds a trained one: "
                    f"use SisaEnsemble.open({str(self.workdir.path)!r})"
                )
            raise NotFittedError(
                "this SisaEnsemble is not fitted yet; call .fit(X, y, ids=...) (or .fit() to load the config's dataset) first"
            )
        return self._manifest

    def spec(self, manifest: dict | None = None) -> TrainSpec:
        m = manifest or self.manifest
        c = self.config
        return TrainSpec(
            seed=c.seed,
            model=c.model.name,
            model_kwargs=dict(c.model.kwargs),
            optim={k: getattr(c.training, k) for k in ("optimizer", "lr", "weight_decay", "momentum", "lr_gamma")},
            epochs_per_stage=c.epochs_per_stage(),
            batch_size=c.training.batch_size,
            input_shape=tuple(m["input_shape"]),
            num_classes=m["num_classes"],
            threads=c.training.threads,
            accelerator="gpu" if c.resources.num_gpus > 0 else "cpu",
        )

    def storage(self):
        return self.workdir.storage(self.config.storage.uri, self.config.storage.options)

    @property
    def executor(self):
        if self._executor is None:
            if self._executor_name == "inprocess":
                self._executor = InProcessExecutor()
            elif self._executor_name == "ray":
                c = self.config
                self._executor = RayExecutor(
                    address=c.cluster.address,
                    num_cpus_per_shard=c.resources.num_cpus,
                    num_gpus_per_shard=c.resources.num_gpus,
                    max_retries=c.cluster.max_retries,
                    local_num_cpus=c.cluster.num_cpus,
                    max_workers=c.cluster.max_workers,
                    threads=c.training.threads,
                )
            else:
                raise DataError(f"unknown executor {self._executor_name!r}; use 'ray' or 'inprocess'")
        return self._executor

    def tracker(self):
        from sisa.tracking.runs import Tracker

        return Tracker(self.config, self.workdir, self._tracking_uri)

    def close(self) -> None:
        """Release warm workers (Ray itself is left running)."""
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- training -------------------------------------------------------------------------------
    def fit(self, X=None, y=None, ids=None, eval_set=None, overwrite: bool = False, progress=None) -> SisaEnsemble:
        """Partition, store and train every shard. With no arrays, loads the config's dataset.

        ``eval_set=(X_test, y_test, ids_test)`` is used for the accuracy figures; rows of the config's
        dataset are held out by ``data.test_fraction``. These rows are stored in the workdir with their ids,
        and `delete` erases them too; ``eval_set=(X_test, y_test)`` rows cannot be named (a warning says so).
        """
        from sisa.ops.fit import fit as _fit

        _fit(self, X, y, ids, eval_set, overwrite, progress)
        return self

    def run_plans(self, manifest: dict, plans: list[ShardPlan], on_stage=None) -> list[ShardPlan]:
        if isinstance(self.executor, InProcessExecutor):
            with torch.random.fork_rng(devices=[]):
                threads = torch.get_num_threads()
                try:
                    return self.executor.run(self.storage(), self.spec(manifest), plans, on_stage)
                finally:
                    torch.set_num_threads(threads)
        return self.executor.run(self.storage(), self.spec(manifest), plans, on_stage)

    def commit(self, manifest: dict) -> None:
        """Atomically switch to ``manifest`` (the model swap), then drop models it no longer uses."""
        self.workdir.write_manifest(manifest)
        with self._state_lock:
            self._manifest = manifest
            self._manifest_sig = self._disk_sig()
            self._agg = None
            self._prune_models(manifest)

    def _disk_sig(self):
        try:
            st = self.workdir.manifest_path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _follow_disk(self) -> None:
        """Pick up a manifest another process committed (a deletion excluding or swapping shards), so that
        this process never keeps serving a model that saw deleted rows. One stat() per call."""
        if self._manifest is None:
            return
        sig = self._disk_sig()
        if sig is not None and sig != self._manifest_sig:
            if self._manifest_sig is not None:
                self._manifest = self.workdir.read_manifest()
                self._agg = None
                self._prune_models(self._manifest)
            self._manifest_sig = sig

    def _prune_models(self, manifest: dict) -> None:
        """Forget loaded sub-models whose final checkpoint ``manifest`` no longer names."""
        keep = {(s, sh["checkpoints"][-1]["sha256"]) for s, sh in enumerate(manifest["shards"]) if sh["checkpoints"]}
        self._models = {k: v for k, v in self._models.items() if k in keep}

    def purge(self) -> list[str]:
        return purge_unreferenced(self.storage(), self.manifest)

    # -- prediction -----------------------------------------------------------------------------
    def active_shards(self, manifest: dict | None = None) -> list[int]:
        m = manifest or self.manifest
        R = self.config.sharding.slices
        return [
            s
            for s, sh in enumerate(m["shards"])
            if not sh.get("excluded") and len(sh["checkpoints"]) == R and sh["checkpoints"][-1]["rows"] > 0
        ]

    def load_shard_model(self, shard: int, manifest: dict | None = None) -> torch.nn.Module:
        m = manifest or self.manifest
        entry = m["shards"][shard]["checkpoints"][-1]
        store = self.storage()
        ckpt = training.load_checkpoint(store.read(entry["file"], entry["sha256"]), store.describe(entry["file"]))
        with torch.random.fork_rng(devices=[]):
            module = training.init_module(self.spec(m), shard)
        module.load_state_dict(ckpt["state_dict"])
        return module.eval()

    def aggregator(self) -> Aggregator:
        """The aggregator over the active shards, following deletions that other processes commit.

        While some shards are active, predictions come from them alone: a deletion excludes the shards that
        held the rows until they are retrained, so the ensemble answers with fewer members for that time.
        When a deletion is retraining every active shard, this waits up to ``wait_timeout`` seconds for the
        new models (following the manifest on disk), then raises `RetrainingError` naming the request and
        its expected remaining time. `NotFittedError` only when every training row has been deleted."""
        start = time.monotonic()
        deadline = start + self.wait_timeout
        while True:
            with self._state_lock:
                self._follow_disk()
                if self._agg is not None:
                    return self._agg
                m = self.manifest
                active = self.active_shards(m)
                if active:
                    self._agg = self._build_aggregator(m, active)
                    return self._agg
                if not any(sh.get("excluded") for sh in m["shards"]):
                    raise NotFittedError(
                        "no shard holds data any more: every training row of this ensemble has been deleted, "
                        "so there is nothing to predict from; train a new ensemble on the data you still hold"
                    )
            running = self.workdir.busy()  # False: the deletion's process died; the next open() finishes it
            if not running or time.monotonic() >= deadline or self.workdir.holds_lock():
                from sisa.ops.delete import retraining_error

                raise retraining_error(m, running, time.monotonic() - start, self.wait_timeout)
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _build_aggregator(self, m: dict, active: list[int]) -> Aggregator:
        c = self.config.aggregation
        models = {}
        for s in active:  # a deletion retrains a few shards: the others are not loaded again
            key = (s, m["shards"][s]["checkpoints"][-1]["sha256"])
            if key not in self._models:
                self._models[key] = self.load_shard_model(s, m)
            models[s] = self._models[key]
        return Aggregator(models, m["num_classes"], c.method, c.weights)

    def predict_proba(self, X) -> np.ndarray:
        """(n, classes) aggregated class probabilities (vote shares for majority_vote).

        ``X``: an array (n, *input_shape), positional as at fit, or a DataFrame / pyarrow Table whose
        columns are matched to the training features by name (id and label columns are dropped)."""
        m, d = self.manifest, self.config.data
        X = datamod.select_features(X, m.get("feature_names"), d.id_column, d.label_column)
        X = datamod.check_features(X, m["input_shape"])
        return self.aggregator().predict_proba(X)

    def predict(self, X) -> np.ndarray:
        return decide(self.predict_proba(X))

    def shard_of(self, id_) -> tuple[int, int]:
        """(shard, slice) of one id, both 0-based; the slice's rows are first seen at stage slice+1.

        The id is canonicalised like every other entry point's (`shards.ids`); once fitted, an id of the
        other kind than the ensemble's (``"7"`` for int ids) is refused, as `delete` refuses it."""
        c = self.config
        if not is_scalar_id(id_):
            raise DataError(f"shard_of takes one id, got a {type(id_).__name__}; call it once per id")
        kind = self._manifest["id_kind"] if self._manifest is not None else None
        ids, _ = canonical_ids(id_, kind)
        return _shard_of(ids.tolist()[0], c.seed, c.sharding.shards, c.sharding.slices)

    def evaluate(self, manifest: dict | None = None) -> dict:
        """Accuracy of the ensemble and of each active shard on the stored evaluation rows."""
        rows = evalfile.read(self.workdir.path)  # (id, y, x), or (y, x) in a file without ids
        if rows is None or len(rows) == 0 or not self.active_shards(manifest):
            return {}
        agg = self.aggregator()
        X, y = np.ascontiguousarray(rows["x"]), rows["y"]
        proba, per = agg.predict_all(X)  # one forward pass per sub-model for both figures
        return {
            "ensemble_accuracy": float((decide(proba) == y).mean()),
            "shard_accuracy": {str(s): float((p == y).mean()) for s, p in zip(agg.shards, per)},
            "eval_rows": int(len(y)),
        }

    def status(self) -> dict:
        from sisa.ledger import Ledger

        m = self.manifest
        shards = []
        for s, sh in enumerate(m["shards"]):
            shards.append(
                {
                    "shard": s,
                    "rows": sum(e["rows"] for e in sh["slices"]),
                    "slice_rows": [e["rows"] for e in sh["slices"]],
                    "checkpoints": len(sh["checkpoints"]),
                    "active": s in self.active_shards(m),
                    "accuracy": m.get("metrics", {}).get("shard_accuracy", {}).get(str(s)),
                }
            )
        reqs = Ledger(self.workdir.path / "ledger.db").requests()
        return {
            "workdir": str(self.workdir.path),
            "name": self.config.name,
            "shards": shards,
            "slices": self.config.sharding.slices,
            "epochs_per_stage": list(self.config.epochs_per_stage()),
            "rows": sum(x["rows"] for x in shards),
            "ensemble_accuracy": m.get("metrics", {}).get("ensemble_accuracy"),
            "deletions": {
                "done": sum(r["state"] == "done" for r in reqs),
                "unfinished": sum(r["state"] != "done" for r in reqs),
            },
            "config_hash": m["config_hash"],
        }

    # -- deletion -------------------------------------------------------------------------------
    def estimate_deletion_cost(self, ids):
        """Dry run of `delete`: shards hit, first stage each retrains from, sample-epochs vs a full retrain."""
        from sisa.ops.delete import estimate

        return estimate(self, ids)

    def delete(self, ids, progress=None):
        """Forget ``ids`` exactly (training rows and held-out evaluation rows); returns a Receipt once the
        ensemble no longer depends on them and no copy of their rows is left."""
        from sisa.ops.delete import delete

        return delete(self, ids, progress)

    def verify(self, receipt=None, timeout: float | None = None):
        """Re-check a deletion certificate: retrain the receipt's shards from scratch in a fresh process and
        compare bit for bit, check lineage, ledger and signature. ``receipt=None`` audits the whole ensemble.
        Returns a `sisa.audit.AuditReport` (``.ok``, ``.shards``, ``.failures()``, ``.text()``)."""
        from sisa.audit.certificate import verify

        return verify(self, receipt, timeout)

    def repair(self) -> dict:
        """Rebuild missing or corrupt checkpoints from the last clean one (bit-identical, same names)."""
        from sisa.ops.repair import repair

        return repair(self)

    def write_config(self) -> None:
        write_atomic(self.workdir.path / "config.yaml", dump_yaml(self.config).encode())

    def resolve_data_path(self, rel: str) -> Path:
        return self.workdir.inside(rel, "data.path")
