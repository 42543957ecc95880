"""`SisaEnsemble`: the user's verbs (fit, predict, delete, verify, repair, status ...), the sklearn way.

The ensemble owns its state: the config, the committed `Manifest` and the `OpContext` its operations run
in. Operations (`sisa.ops`) are functions of that context; the only way a manifest becomes current is
``_commit``, which the ensemble hands to the context. Prediction goes through `sisa.serving.Server`, which
follows manifests that other processes commit.
"""

from __future__ import annotations

import numpy as np

from shards import errors as shard_errors
from shards.errors import DataError
from shards.ids import canonical_ids, is_scalar_id, unique_request
from shards.partition import shard_of as _shard_of
from sisa import data as datamod
from sisa import manifest as manifests
from sisa.config import SisaConfig, load_config
from sisa.context import OpContext
from sisa.manifest import Manifest
from sisa.serving import Server
from sisa.tracking.runs import observer_for
from sisa.workdir import Workdir

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
        """``config``: a YAML path, a dict or a SisaConfig. ``executor``: "ray" or "inprocess" (default:
        ``cluster.executor``). ``wait_timeout``: how long `predict` waits, in seconds, while a deletion
        retrains every active shard, before it raises `RetrainingError`; 0 never waits."""
        config = load_config(config)
        self.workdir = Workdir(workdir)
        self._ctx = OpContext(config, self.workdir, self._commit, executor or config.cluster.executor, tracking_uri)
        self._ctx.observer = observer_for(self._ctx)
        self._server = Server(self._ctx, wait_timeout)
        self.last_fit_metrics: dict = {}

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
        excluded from prediction."""
        wd = Workdir(workdir)
        manifests.read(wd.path)  # a workdir without a trained ensemble says so before anything else
        ens = cls(
            wd.path / "config.yaml", wd.path, executor=executor, tracking_uri=tracking_uri, wait_timeout=wait_timeout
        )
        m = ens._server.load()  # stat, then read: a commit in between is picked up by the next predict
        ens._ctx.check_trained_with(m)  # config.yaml edited since the fit: a clear refusal
        if recover:
            from sisa.ops.add import recover as _recover  # additions and deletions, in ledger order

            _recover(ens._ctx, wait=False)
        return ens

    # -- state ------------------------------------------------------------------------------------------
    @property
    def config(self) -> SisaConfig:
        return self._ctx.config

    @property
    def manifest(self) -> Manifest:
        """The committed manifest (typed; ``manifest["shards"]`` style reads of its JSON form also work)."""
        m = self._server.manifest
        if m is None:
            if self.workdir.exists():
                raise shard_errors.NotFittedError(
                    f"this SisaEnsemble is not fitted, but {self.workdir.path} holds a trained one: "
                    f"use SisaEnsemble.open({str(self.workdir.path)!r})"
                )
            raise shard_errors.NotFittedError(
                "this SisaEnsemble is not fitted yet; call .fit(X, y, ids=...) (or .fit() to load the config's dataset) first"
            )
        return m

    def __sklearn_is_fitted__(self) -> bool:
        return self._server.manifest is not None

    def _check_config(self) -> None:
        """A handle made by `from_config` on a trained workdir skips `open`'s config check: an operation that
        writes makes it before it records anything."""
        m = self._server.manifest
        if m is None and self.workdir.exists():
            m = manifests.read(self.workdir.path)
        if m is not None:
            self._ctx.check_trained_with(m)

    def __sklearn_tags__(self):
        """A classifier, for sklearn's `check_is_fitted` (sklearn is imported only when it asks)."""
        from sklearn.utils import ClassifierTags, Tags, TargetTags

        return Tags(estimator_type="classifier", target_tags=TargetTags(required=True), classifier_tags=ClassifierTags())

    def _commit(self, m: Manifest | None) -> None:
        """Atomically switch to ``m`` (the model swap); None forgets the manifest (a refit starts over)."""
        if m is None:
            self.workdir.manifest_path.unlink(missing_ok=True)
        else:
            manifests.write(self.workdir.manifest_path, m)
        self._server.set(m)

    def close(self) -> None:
        """Release warm workers (Ray itself is left running)."""
        self._ctx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- inspection --------------------------------------------------------------------------------------
    def storage(self):
        """The store of slice and checkpoint files (local, a shared mount, or an object store)."""
        return self._ctx.storage()

    def active_shards(self) -> list[int]:
        """Shards that serve predictions now."""
        return self._ctx.active_shards(self.manifest)

    def load_shard_model(self, shard: int):
        """Shard ``shard``'s final sub-model (a LightningModule in eval mode), e.g. to compare weights."""
        return self._ctx.load_model(shard, self.manifest)

    # -- the verbs ---------------------------------------------------------------------------------------
    def fit(
        self,
        X=None,
        y=None,
        ids=None,
        eval_set=None,
        overwrite: bool = False,
        progress=None,
        readmit=None,
        risk=None,
        base=None,
    ) -> SisaEnsemble:
        """Partition, store and train every shard. With no arrays, loads the config's dataset.

        ``eval_set=(X_test, y_test, ids_test)`` is used for the accuracy figures; rows of the config's
        dataset are held out by ``data.test_fraction``. These rows are stored in the workdir with their ids,
        and `delete` erases them too; ``eval_set=(X_test, y_test)`` rows cannot be named (a warning says so).
        ``progress(plan, entry, metrics)`` is called after every stage. A refit (``overwrite=True``) refuses
        ids this workdir erased, unless named in ``readmit`` (recorded in the ledger). ``risk``: each row's
        deletion prior (a probability or a ``sharding.risk_classes`` name) for a deletion-aware
        ``sharding.placement``; a refit with new priors re-places the rows. ``base=(X_base, y_base[, ids_base])``
        (or ``data.base``): rows declared non-erasable, trained once into the start every shard shares;
        `delete` refuses their ids, only a refit without them removes them (see the README)."""
        from sisa.ops.fit import fit as _fit

        m = _fit(self._ctx, X, y, ids, eval_set, overwrite, progress, readmit, risk, base)
        self.last_fit_metrics = dict(m.metrics)
        return self

    def predict_proba(self, X) -> np.ndarray:
        """(n, classes) aggregated class probabilities (vote shares for majority_vote).

        ``X``: an array (n, *input_shape), positional as at fit, or a DataFrame / pyarrow Table whose
        columns are matched to the training features by name (id and label columns are dropped)."""
        m, d = self.manifest, self.config.data
        X = datamod.select_features(X, m.feature_names, d.id_column, d.label_column)
        X = datamod.check_features(X, m.input_shape)
        return self._server.aggregator().predict_proba(X)

    def predict(self, X) -> np.ndarray:
        """(n,) predicted class indices."""
        from sisa.aggregate import decide

        return decide(self.predict_proba(X))

    def shard_of(self, id_, risk=None) -> tuple[int, int]:
        """(shard, slice) of one id, both 0-based; the slice's rows are first seen at stage slice+1.

        The id is canonicalised like every other entry point's (`shards.ids`); once fitted, an id of the
        other kind than the ensemble's (``"7"`` for int ids) is refused, as `delete` refuses it."""
        c = self.config
        if not is_scalar_id(id_):
            raise DataError(f"shard_of takes one id, got a {type(id_).__name__}; call it once per id")
        m = self._server.manifest
        ids, _ = canonical_ids(id_, m.id_kind if m is not None else None)
        if c.sharding.placement != "uniform" and risk is None:  # the place depends on the stored prior
            loc = self.locate(ids.tolist())[0]
            if loc.shard is None:
                raise DataError(f"id is not a training row of this ensemble ({loc.where}); pass its risk= to compute")
            return loc.shard, loc.slice
        if risk is not None:
            from sisa.risk import resolve

            risk = float(resolve(c, [risk], 1)[0])
        return _shard_of(ids.tolist()[0], c.seed, c.sharding.shards, c.sharding.slices, risk, c.placement())

    def status(self) -> dict:
        """Shards, slices, sizes, checkpoints, accuracy and deletions, as a dict (`sisa status --json`)."""
        from sisa.ops.inspect import status

        return status(self._ctx, self.manifest)

    def locate(self, ids) -> list:
        """Where each id is, in the order given (duplicates once): a `sisa.ops.locate.Location` with ``where``
        "training" (``shard``, ``slice``), "held_out", "deleted" (``request_id``, ``deleted_at``) or "unknown"."""
        from sisa.ops.locate import where

        m = self.manifest
        return where(self._ctx, m, unique_request(ids, m.id_kind))

    def estimate_deletion_cost(self, ids):
        """Dry run of `delete`: shards hit, first stage each retrains from, sample-epochs vs a full retrain."""
        from sisa.ops.delete import estimate

        return estimate(self._ctx, self.manifest, ids)

    def delete(self, ids, progress=None, wait: str = "done"):
        """Forget ``ids`` exactly (training rows and held-out evaluation rows); returns the signed Receipt.

        ``wait="done"`` (default): once no copy of their rows is left anywhere, MLflow's model versions
        included, and the bookkeeping that follows that moment (re-evaluation, MLflow run) is done.
        ``wait="effective"``: as soon as the retrained models serve and the store holds no byte of the rows;
        the MLflow work (publish, purge of the versions that saw the rows, run) and the re-evaluation stay
        owed, durably, and are finished in one batch by `settle`, by the next ``wait="done"`` deletion, or
        by the next `open`. ``receipt.timing`` has ``state``, ``effective_at`` (and ``done_at``,
        ``seconds_to_logged``) and the fixed costs by phase (``phase_seconds``)."""
        from sisa.ops.add import recover
        from sisa.ops.delete import delete

        self._check_config()
        with self.workdir.lock(what="delete"):
            recover(self._ctx, locked=True, settle=False)  # an unfinished addition first; effective ones: below
            return delete(self._ctx, self.manifest, ids, progress, wait)

    def settle(self) -> list[str]:
        """Finish what effective deletions (``delete(..., wait="effective")``) still owe, in one batch: one
        re-evaluation, their MLflow runs, one publish that purges every model version that saw their rows.
        Returns the request ids now done."""
        from sisa.ops.purge import settle

        with self.workdir.lock(what="settle"):
            return settle(self._ctx)

    # -- continual data (sisa.ops.add) -------------------------------------------------------------------
    def estimate_addition_cost(self, X, y=None, ids=None, readmit=None, risk=None):
        """Dry run of `add`: the same checks, the shards hit and the first stage each retrains from, and the
        sample-epochs against a full refit (``y`` may be left out: it does not change the cost)."""
        from sisa.ops.add import estimate

        m = self.manifest
        if y is None and X is not None:
            y = np.zeros(len(X), np.int64)
        return estimate(self._ctx, m, X, y, ids, readmit, risk)

    def add(self, X, y, ids, readmit=None, progress=None, risk=None):
        """Add rows without a refit (``sharding.new_rows``): durable before it returns, logged like a
        deletion. Ids must be new; ids this workdir erased are refused unless named in ``readmit`` (their
        owners consented again; the ledger records it). Returns the signed Receipt (``kind == "add"``)."""
        from sisa.ops.add import add

        self._check_config()
        return add(self._ctx, self.manifest, X, y, ids, readmit, progress, risk)

    # -- compaction (sisa.ops.compact) -------------------------------------------------------------------
    def estimate_compaction_cost(self):
        """Dry run of `compact`: appended slices, the refit's sample-epochs, and the expected cost of one
        uniform deletion before and after (the overhead appended stages add, which compaction removes)."""
        from sisa.ops.compact import estimate

        return estimate(self._ctx, self.manifest)

    def compact(self, progress=None):
        """Refit the live rows into the canonical layout (after ``sharding.new_rows: append`` additions):
        the result equals ``fit(live rows)`` bit for bit. Durable (a ledger request) and crash-safe; the
        superseded files are purged. Returns the signed Receipt (``kind == "compact"``)."""
        from sisa.ops.add import recover
        from sisa.ops.compact import compact

        self._check_config()
        with self.workdir.lock(what="compact"):
            recover(self._ctx, locked=True)  # every unfinished request first, in ledger order
            return compact(self._ctx, self.manifest, progress)

    def verify(self, receipt=None, timeout: float | None = None):
        """Re-check a deletion certificate: retrain the receipt's shards from scratch in a fresh process and
        compare bit for bit, check lineage, ledger and signature. ``receipt=None`` audits the whole ensemble.
        Returns a `sisa.audit.AuditReport` (``.ok``, ``.shards``, ``.failures()``, ``.text()``)."""
        from sisa.audit.certificate import verify

        return verify(self._ctx, self.manifest, receipt, timeout)

    def repair(self) -> dict:
        """Rebuild missing or corrupt checkpoints from the last clean one (bit-identical, same names)."""
        from sisa.ops.repair import repair

        self._check_config()
        return repair(self._ctx)
