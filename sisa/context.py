"""The explicit context an operation runs in: config, workdir, store, executor, observer, loaded models.

Operations (`sisa.ops`) are functions of an `OpContext`; they read the manifest from disk under the
workdir lock and hand every next manifest to ``ctx.commit``, which belongs to the `SisaEnsemble` that
built the context: the ensemble alone switches manifests. The context owns the lazily created executor,
the store handle and the cache of loaded sub-models (shared with prediction).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from shards.errors import ConfigError, WorkdirError
from sisa import evalfile
from sisa import manifest as manifests
from sisa.config import SisaConfig, dump_yaml
from sisa.ledger import Ledger
from sisa.manifest import Manifest
from sisa.tracking.observer import Observer
from sisa.workdir import Workdir, write_atomic

if TYPE_CHECKING:  # torch loads when a model is used, not with the context (`sisa status` needs none)
    from sisa.aggregate import Aggregator

EXECUTORS = ("ray", "inprocess")


class OpContext:
    def __init__(
        self,
        config: SisaConfig,
        workdir: Workdir,
        commit: Callable[[Manifest], None],
        executor: str,
        tracking_uri: str | None = None,
        observer: Observer | None = None,
    ):
        if executor not in EXECUTORS:
            raise ConfigError(f"unknown executor {executor!r}; use 'ray' or 'inprocess'", problems=["cluster.executor"])
        self.config, self.workdir, self.commit = config, workdir, commit
        self.executor_name, self.tracking_uri = executor, tracking_uri
        self.observer = observer or Observer()
        self._executor = None
        self._models: dict[tuple[int, str], object] = {}  # (shard, checkpoint sha256) -> sub-model
        self._encoder: tuple[str, object] | None = None  # (sha256, the frozen encoder of model.encoder)
        # (eval file sha256, shard, checkpoint sha256, method) -> the sub-model's outputs on the eval rows
        self._evals: dict[tuple, tuple] = {}
        self._lock = threading.RLock()
        self._tracker = None

    # -- where things are ---------------------------------------------------------------------------------
    def storage(self):
        return self.workdir.storage(self.config.storage.uri, self.config.storage.options)

    def ledger(self) -> Ledger:
        return Ledger(self.workdir.path / "ledger.db")

    def read_manifest(self) -> Manifest:
        return manifests.read(self.workdir.path)

    def write_config(self) -> None:
        write_atomic(self.workdir.path / "config.yaml", dump_yaml(self.config).encode())

    @property
    def executor(self):
        if self._executor is None:
            from orchestration import InProcessExecutor, RayExecutor

            c = self.config
            if self.executor_name == "inprocess":
                self._executor = InProcessExecutor()
            else:
                self._executor = RayExecutor(
                    address=c.cluster.address,
                    num_cpus_per_shard=c.resources.num_cpus,
                    num_gpus_per_shard=c.resources.num_gpus,
                    max_retries=c.cluster.max_retries,
                    local_num_cpus=c.cluster.num_cpus,
                    max_workers=c.cluster.max_workers,
                    threads=c.training.threads,
                )
        return self._executor

    def drop_caches(self) -> None:
        """Forget cached shard data in warm workers (after a deletion)."""
        if self._executor is not None:
            self._executor.drop_caches()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    # -- training -----------------------------------------------------------------------------------------
    def spec(self, m: Manifest, full: bool = False):
        """What the shards train: with ``model.encoder`` the heads (unless ``full``: the whole model)."""
        from shards.spec import TrainSpec

        c = self.config
        spec = TrainSpec(
            seed=c.seed,
            model=c.model.name,
            model_kwargs=dict(c.model.kwargs),
            optim={k: getattr(c.training, k) for k in ("optimizer", "lr", "weight_decay", "momentum", "lr_gamma")},
            epochs_per_stage=c.epochs_per_stage(),
            batch_size=c.training.batch_size,
            input_shape=tuple(m.input_shape),
            num_classes=m.num_classes,
            threads=c.training.threads,
            accelerator="gpu" if c.resources.num_gpus > 0 else "cpu",
            extra={
                "engine": c.training.engine or m.engine,
                "precision": c.training.precision,  # the workdir's: `engine` refuses another before training
                **({"start": m.base.sha256} if m.base else {}),
            },
        )
        if m.encoder is None or full:
            return spec
        from shards.encoder import head_spec

        if m.encoder.module is not None:  # a user's encoder: the configured model is the head
            return replace(spec, input_shape=(m.encoder.width,))
        return head_spec(spec, m.encoder.width)

    def engine(self, m: Manifest) -> str:
        """The workdir's training engine (`sisa.config.TrainingConfig.engine`): one per workdir, never mixed,
        and so is its ``training.precision``."""
        precision = self.config.training.precision
        if precision != m.precision:
            raise ConfigError(
                f"{self.workdir.path} was trained with training.precision {m.precision!r}, but the config says "
                f"{precision!r}: every retrain of a shard must compute with the precision that trained it. Set "
                f"training.precision: {m.precision}, or train a new workdir",
                problems=[f"training.precision: {precision!r} != the workdir's {m.precision!r}"],
            )
        engine = self.config.training.engine
        if engine is not None and engine != m.engine:
            raise ConfigError(
                f"{self.workdir.path} was trained with training.engine {m.engine!r}, but the config says {engine!r}: "
                f"every retrain of a shard must run the code path that trained it. Set training.engine: {m.engine} "
                "(or leave it unset), or train a new workdir",
                problems=[f"training.engine: {engine!r} != the workdir's {m.engine!r}"],
            )
        return m.engine

    def check_trained_with(self, m: Manifest) -> None:
        """Refuse a config other than the one that trained ``m`` (its engine and precision, then everything
        `SisaConfig.training_hash` covers; what fit filled in, an unset engine or class count, is taken from
        ``m``): every retrain must compute what the fit computed. Called before an operation records anything."""
        self.engine(m)
        c = self.config
        filled = [c]  # as given (a workdir's own config.yaml, older ones included), then with fit's fill-ins
        if c.training.engine is None:
            filled += [f.with_engine(m.engine) for f in filled]
        if c.data.num_classes is None:
            filled += [f.with_num_classes(m.num_classes) for f in filled]
        if m.training_hash not in {f.training_hash() for f in filled}:
            raise WorkdirError(
                f"this config does not match the config {self.workdir.path} was trained with (training hash "
                f"{c.training_hash()} != {m.training_hash}): open it with SisaEnsemble.open({str(self.workdir.path)!r}), "
                "which reads its config.yaml, restore that config, or train a new workdir"
            )

    def run_plans(self, op: str, m: Manifest, plans: list, on_stage=None, meanwhile=None) -> list:
        """Train ``plans`` (each a shard from some stage to the last); every finished stage goes to the
        observer, then to ``on_stage`` (crash points); ``meanwhile()`` runs once while the first stages train
        (on Ray; in-process, before). The caller's torch RNG and thread count are kept."""
        import torch

        self.engine(m)
        if m.base is not None:  # every shard's stage 1 starts from the shared start (shards.base)
            for p in plans:
                if p.start_stage == 1 and p.prev is None:
                    p.prev = m.base.entry()

        def stage(plan, entry, metrics):
            if on_stage is not None:
                on_stage(plan, entry, metrics)
            self.observer.stage(op, plan, entry, metrics)

        if self.executor_name == "inprocess":
            with torch.random.fork_rng(devices=[]):
                threads = torch.get_num_threads()
                try:
                    return self.executor.run(self.storage(), self.spec(m), plans, stage, meanwhile)
                finally:
                    torch.set_num_threads(threads)
        return self.executor.run(self.storage(), self.spec(m), plans, stage, meanwhile)

    # -- models -------------------------------------------------------------------------------------------
    def active_shards(self, m: Manifest) -> list[int]:
        return m.active_shards(self.config.sharding.slices)

    def load_model(self, shard: int, m: Manifest):
        """The shard's final sub-model (digest-checked, ``weights_only``), cached by checkpoint digest."""
        import torch

        from shards import training

        entry = m.shards[shard].final
        key = (shard, entry.sha256)
        with self._lock:
            if key in self._models:
                return self._models[key]
        store = self.storage()
        ckpt = training.load_checkpoint(store.read(entry.file, entry.sha256), store.describe(entry.file))
        with self._lock, torch.random.fork_rng(devices=[]):  # one thread at a time seeds and restores torch
            module = training.init_module(self.spec(m), shard)
        module.load_state_dict(ckpt["state_dict"])
        module.eval()
        with self._lock:
            self._models[key] = module
        return module

    def state_dict(self, shard: int, m: Manifest) -> dict:
        """The shard's final weights: the loaded sub-model's, else its checkpoint's (digest-checked,
        ``weights_only``), without building the sub-model (a publish right after a deletion)."""
        from shards import training

        entry = m.shards[shard].final
        with self._lock:
            module = self._models.get((shard, entry.sha256))
        if module is not None:
            return module.state_dict()
        store = self.storage()
        return training.load_checkpoint(store.read(entry.file, entry.sha256), store.describe(entry.file))["state_dict"]

    def encoder(self, m: Manifest):
        """The frozen encoder ``m`` names (digest-checked, ``weights_only``, its outputs checked against the
        probe recorded at fit), or None without one."""
        if m.encoder is None:
            return None
        from shards import encoder

        e = m.encoder
        key = f"{e.module}:{e.sha256}:{e.probe}"
        with self._lock:
            if self._encoder is None or self._encoder[0] != key:
                module = encoder.load(self.storage(), self.spec(m, full=True), e.file, e.sha256, e.module)
                encoder.check_probe(module, m.input_shape, e.probe, e.module or self.storage().describe(e.file))
                self._encoder = (key, module)
            return self._encoder[1]

    def prune_models(self, m: Manifest) -> None:
        """Forget loaded sub-models whose final checkpoint ``m`` no longer names."""
        keep = {(s, sh.final.sha256) for s, sh in enumerate(m.shards) if sh.final is not None}
        with self._lock:
            self._models = {k: v for k, v in self._models.items() if k in keep}

    def aggregator(self, m: Manifest, active: list[int] | None = None) -> Aggregator:
        from sisa.aggregate import Aggregator

        active = self.active_shards(m) if active is None else active
        a = self.config.aggregation
        models = {s: self.load_model(s, m) for s in active}
        return Aggregator(models, m.num_classes, a.method, a.weights, encoder=self.encoder(m))

    def evaluate(self, m: Manifest) -> dict:
        """Accuracy of the ensemble and of each active shard on the stored evaluation rows.

        Incremental: each sub-model's outputs on the rows are kept in memory, keyed by the evaluation file's
        digest and the sub-model's checkpoint digest, so after a deletion only the retrained shards run (an
        erased evaluation row changes the digest: everything runs again). The figures are the same, bit
        for bit, as evaluating every shard afresh (`sisa.aggregate.shard_outputs`, `combine`)."""
        from sisa.aggregate import combine, decide, shard_outputs, shard_weights

        active = self.active_shards(m)
        rows = self._eval_rows(m) if active else None
        if rows is None:
            return {}
        digest, X, y = rows
        a = self.config.aggregation
        keys = {s: (digest, s, m.shards[s].final.sha256, a.method) for s in active}
        with self._lock:
            self._evals = {k: v for k, v in self._evals.items() if k in keys.values()}
            outs = {s: self._evals.get(k) for s, k in keys.items()}
        for s in active:
            if outs[s] is None:
                outs[s] = shard_outputs(self.load_model(s, m), X, a.method, m.num_classes)
                with self._lock:
                    self._evals[keys[s]] = outs[s]
        proba = combine([outs[s][0] for s in active], shard_weights(active, a.weights))
        return {
            "ensemble_accuracy": float((decide(proba) == y).mean()),
            "shard_accuracy": {str(s): float((outs[s][1].numpy() == y).mean()) for s in active},
            "eval_rows": int(len(y)),
        }

    def _eval_rows(self, m: Manifest):
        """(digest, X, y) of the stored evaluation rows (through the encoder, with one), or None."""
        import hashlib

        import torch

        rows = evalfile.read(self.workdir.path)  # (id, y, x), or (y, x) in a file without ids
        if rows is None or len(rows) == 0:
            return None
        X = torch.from_numpy(np.array(rows["x"], dtype=np.float32, order="C", copy=True))
        if m.encoder is not None:
            with torch.no_grad():
                X = self.encoder(m)(X)
        return hashlib.sha256(rows.tobytes()).hexdigest(), X, rows["y"]

    def forget_evaluations(self) -> None:
        """Drop the cached outputs on the evaluation rows (derived from them: after an erasure)."""
        with self._lock:
            self._evals = {}

    # -- MLflow: the registered model is a copy to keep exact, not a log ---------------------------------
    def tracker(self):
        """The ensemble's MLflow tracker, kept while the config is the same (its client, engines and
        experiment id are looked up once)."""
        from sisa.tracking.runs import Tracker

        if self._tracker is None or self._tracker.config is not self.config:
            self._tracker = Tracker(self.config, self.workdir, self.tracking_uri)
        return self._tracker

    def publish(
        self, m: Manifest, purge: bool = False, request_id: str | None = None, run_id: str | None = None, staged=None
    ):
        """Register ``m``'s ensemble as the ``current`` MLflow model version; with ``purge``, delete every
        other version (each saw rows that a deletion removed). A no-op when tracking is off. ``staged``:
        the version `sisa.tracking.registry.stage` prepared while the shards retrained."""
        return self.tracker().publish(self, m, run_id=run_id, purge=purge, request_id=request_id, staged=staged)
