"""The fit operation: validate, partition and store the data, train every shard, commit the manifest.

Nothing is left half-written: the manifest is written last, and on any failure the files this call
created are removed again. Runs over an explicit `sisa.context.OpContext`.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import time
import warnings

import numpy as np

from orchestration import ShardPlan
from shards.errors import ConfigError, DataError, WorkdirError
from shards.ingest import wipe_stale_spills
from shards.storage import zero_and_remove
from shards.store import write_partition
from sisa import data as datamod
from sisa import evalfile
from sisa.config import EncoderConfig
from sisa.manifest import Checkpoint, Manifest, ShardState, SliceRef
from sisa.ops import base as startops
from sisa.risk import resolve as resolve_risk
from sisa.workdir import purge_unreferenced, write_atomic

OP = "fit"


def load_arrays(ctx, X, y, ids, eval_set, risk=None):
    """Validated (X, y, ids, id kind, eval_set, feature names, risk) for an in-memory fit.

    ``eval_set`` comes back as (X, y, ids or None): the held-out rows of the config's dataset keep their
    ids, and a user's ``eval_set=(X, y, ids)`` may name its rows so that they can be erased too. ``risk``
    (the deletion priors, `sisa.risk`) comes back validated, or None under the uniform placement."""
    c = ctx.config
    names = None
    if X is None:
        X, y, ids, eval_set, names, risk = _config_dataset(ctx, risk)
    elif y is None:
        raise DataError("fit(X) needs labels: call fit(X, y, ids=...)")
    elif datamod.is_table(X):  # a DataFrame: its column names are recorded and matched at predict
        drop = (c.data.id_column, c.data.label_column, c.data.risk_column)
        if c.data.risk_column and risk is None and c.data.risk_column in map(str, datamod.table_columns(X)):
            col = X[c.data.risk_column]
            risk = np.asarray(col.to_pylist() if hasattr(col, "to_pylist") else list(col), dtype=object)
        if c.data.risk_column in map(str, datamod.table_columns(X)):  # the prior is never a feature
            rc = c.data.risk_column
            X = X.drop_columns([rc]) if hasattr(X, "drop_columns") else X.drop(columns=[rc])
        names = [str(n) for n in datamod.table_columns(X) if str(n) not in drop]
        X = datamod.select_features(X, names, c.data.id_column, c.data.label_column)
    X, y, ids, kind = datamod.check_training(X, y, ids, c.sharding.shards, c.sharding.slices)
    risk = resolve_risk(c, risk, len(X))
    if eval_set is not None:
        eval_set = _check_eval_set(eval_set, X.shape[1:], names, kind, ids, c.data)
    return X, y, ids, kind, eval_set, names, risk


def _config_dataset(ctx, risk):
    """The config's dataset (built in or a file), its held-out rows split off: X, y, ids, eval_set, names, risk."""
    c = ctx.config
    names = None
    src = c.data.source
    if src == "arrays":
        raise DataError(
            "no data: pass fit(X, y, ids=...) or set data.source in the config (digits, synthetic, npz, csv, parquet)"
        )
    if src in ("digits", "synthetic"):
        X, y, ids = datamod.builtin(src, c.data)
    else:
        path = ctx.workdir.inside(c.data.path, "data.path")
        got = datamod.from_file(path, c.data.id_column, c.data.label_column, c.data.risk_column)
        X, y, ids, names = got[:4]
        risk = got[4] if c.data.risk_column and risk is None else risk
    X, y, ids, kind = datamod.check_training(X, y, ids, 1, 1)
    if risk is not None:
        risk = resolve_risk(c, risk, len(X))  # checked on all rows, so a bad row is named as in the file
    split = datamod.split_holdout(X, y, ids, c.seed, c.data.test_fraction, risk)
    (X, y, ids), eval_set = split[:2]
    return X, y, ids, eval_set, names, (split[2] if risk is not None else None)


def _check_eval_set(eval_set, input_shape, names, kind, train_ids, cfg_data):
    if not isinstance(eval_set, (tuple, list)) or len(eval_set) not in (2, 3):
        raise DataError("eval_set must be (X_test, y_test) or (X_test, y_test, ids_test)")
    ex = datamod.select_features(eval_set[0], names, cfg_data.id_column, cfg_data.label_column)
    ex = datamod.check_features(ex, input_shape)
    ey = datamod.check_labels(eval_set[1], len(ex), "eval_set labels")
    eids = eval_set[2] if len(eval_set) == 3 else None
    if eids is not None:
        eids, _ = datamod.canonical_ids(eids, kind)
        if len(eids) != len(ex):
            raise DataError(f"eval_set has {len(ex)} rows but {len(eids)} ids; give one id per row")
        both = np.concatenate([train_ids, eids])
        uniq, counts = np.unique(both, return_counts=True)
        if len(uniq) != len(both):
            dup = uniq[counts > 1][:5].tolist()
            raise DataError(
                f"ids must be unique across the training rows and eval_set; {int((counts > 1).sum())} repeat, e.g. {dup}",
                ids=dup,
            )
    return ex, ey, eids


def fit(ctx, X, y, ids, eval_set, overwrite: bool, progress, readmit=None, risk=None, base=None) -> Manifest:
    """Train the ensemble from arrays, the config's dataset or a Parquet source; returns the committed manifest.
    ``risk``: each row's deletion prior, for a deletion-aware ``sharding.placement`` (`sisa.risk`).
    ``base``: non-erasable rows every shard starts from (`sisa.ops.base`), or ``data.base``."""
    c = ctx.config
    _check_gpus(ctx)
    start = startops.prepare(ctx, base)  # model.init's digest is checked here, before anything is written
    parquet = datamod.parquet_source(X, y, ids, eval_set, c.data, lambda rel: ctx.workdir.inside(rel, "data.path"))
    startops.check_encoder(ctx, start, parquet is not None)
    data = user = None
    if parquet is not None and risk is not None:
        raise DataError(
            "a streaming Parquet source reads each row's deletion prior from its own column: set data.risk_column "
            "instead of passing risk=[...] (or read the table and call fit(X, y, ids=..., risk=...))"
        )
    if parquet is None:
        X, y, ids, kind, eval_set, names, risk = load_arrays(ctx, X, y, ids, eval_set, risk)
        eval_ids = eval_set[2] if eval_set is not None and eval_set[2] is not None else []
        startops.check(start, X.shape[1:], names, kind, [*ids.tolist(), *list(eval_ids)], c.data)
        num_classes = _num_classes(ctx, max(int(y.max()), start.max_label), X.shape[1:])
        if isinstance(c.model.encoder, EncoderConfig):  # a user's encoder: loaded and checked before any write
            user = startops.user_encoder(ctx, X.shape[1:], X, start)
        startops.check_init(ctx, start, X.shape[1:] if user is None else (user[0].sisa_width,), num_classes)
        if eval_set is not None and len(eval_set[1]) and int(eval_set[1].max()) >= num_classes:
            raise DataError(
                f"eval_set labels go up to {int(eval_set[1].max())} but the ensemble has {num_classes} classes "
                f"(labels 0..{num_classes - 1}); fix those labels or set data.num_classes"
            )
        data = (X, y, ids, kind, eval_set, names, num_classes, risk)
    wd = ctx.workdir
    with wd.lock(what="fit"):
        if wd.exists() and not overwrite:
            raise WorkdirError(
                f"{wd.path} already holds a trained ensemble; open it with SisaEnsemble.open(), "
                "pick a new workdir, or pass overwrite=True (--overwrite) to replace it"
            )
        storage = ctx.storage()
        _claim(ctx, storage)
        ingested = _ingest(ctx, storage, parquet) if parquet is not None else None  # before anything else changes
        _admit(ctx, storage, data, ingested, readmit, start)  # erased ids stay erased (sisa.ops.add.admit_refit)
        if wd.exists():
            ctx.commit(None)
        try:
            m = _partition(ctx, storage, data, ingested, start, user)
            m = _train(ctx, m, progress, start)
            purge_unreferenced(storage, m)
        except BaseException:
            if not wd.exists():
                _remove_partial(ctx, storage)
            raise
    return m


def _admit(ctx, storage, data, ingested, readmit, start) -> None:
    from sisa.ops.add import admit_refit, slice_ids

    kind = data[3] if data is not None else ingested[0].id_kind
    try:
        base_ids = [] if start.ids is None else datamod.canonical_ids(start.ids, kind)[0].tolist()  # base rows too
        if data is not None:
            eval_ids = data[4][2] if data[4] is not None and data[4][2] is not None else []
            admit_refit(ctx, [*data[2].tolist(), *list(eval_ids), *base_ids], readmit, kind)
        else:
            train_ids = slice_ids(storage, ingested[0].slices)
            admit_refit(ctx, [*train_ids, *base_ids], readmit, kind)
            startops.check_ingested(ctx, start, ingested, train_ids)  # before a refit retires the old ensemble
    except BaseException:
        if ingested is not None:
            purge_unreferenced(storage, ctx.read_manifest() if ctx.workdir.exists() else None)
            zero_and_remove(ingested[2])
        raise


def _partition(ctx, storage, data, ingested, start, user=None) -> Manifest:
    """Write the config, the evaluation file and every slice; the manifest of the untrained ensemble. With
    ``model.encoder`` the start is trained first and the slices hold its encoder's features of the rows."""
    c = ctx.config  # with data.num_classes filled in: the manifest records the hashes of the config as written
    if c.training.engine is None:  # a new workdir trains with the fast engine (recorded, never mixed)
        ctx.config = c = c.with_engine("fast")
    ctx.write_config()
    ctx.workdir.secret()
    if ingested is None:
        X, y, ids, kind, eval_set, names, num_classes, risk = data
        shape = list(X.shape[1:])
    else:
        ing, num_classes, eval_tmp = ingested
        kind, shape, names = ing.id_kind, ing.input_shape, ing.feature_names
    m = Manifest(
        config_hash=c.config_hash(),
        training_hash=c.training_hash(),
        id_kind=kind,
        input_shape=list(shape),
        feature_names=names,
        num_classes=num_classes,
        storage=storage.root,
        created=time.time(),
        engine=c.training.engine,
        precision=c.training.precision,
    )
    if ingested is None:
        _write_eval(ctx.workdir.path / evalfile.NAME, eval_set, kind)
        if c.model.encoder is not None:
            X, m = _encode(ctx, storage, m, start, X, user)
        S, R = c.sharding.shards, c.sharding.slices
        with storage.deferred_sync():  # every slice file durable by one sync, before the manifest names it
            slices = write_partition(storage, ids, X, y, kind, c.seed, S, R, risk=risk, placement=c.placement())
    else:
        zero_and_remove(ctx.workdir.path / evalfile.NAME)  # a refit's old evaluation rows, not just unlinked
        os.replace(eval_tmp, ctx.workdir.path / evalfile.NAME)
        slices = ing.slices
    shards = tuple(ShardState(slices=tuple(SliceRef.from_dict(e) for e in sl)) for sl in slices)
    return dataclasses.replace(m, shards=shards)


def _encode(ctx, storage, m: Manifest, start, X, user):
    """``model.encoder``: the rows' features (`shards.encoder`) and the manifest naming the encoder and the
    start. The start's body: the start is trained first and split. A user's encoder (``user``: module and
    weights, the rows' features): the start, if any, is the head trained on the base rows' features. The
    features are checked finite, and the encoder's `probe` is recorded to be checked on every later load."""
    from shards import encoder

    if user is None:
        m, body = startops.split_encoder(ctx, storage, _train_start(ctx, m, start))
        X = encoder.encode_finite(body, X, "training rows")
    else:
        body, X = user[0], user[2]  # the base rows' features too were computed (and checked) before any write
        m = startops.store_encoder(ctx, storage, m, *user[:2])
        m = _train_start(ctx, m, start)
    return X, dataclasses.replace(m, encoder=dataclasses.replace(m.encoder, probe=encoder.probe(body, m.input_shape)))


def _train(ctx, m: Manifest, progress, start) -> Manifest:
    """Train the shared start (if any) and every shard from stage 1, commit, evaluate, commit, register the
    first model version."""
    t0 = time.time()
    ctx.observer.started(OP, m, {})
    try:
        m = _train_start(ctx, m, start)
        plans = [
            ShardPlan(shard=s, start_stage=1, slices=[e.to_dict() for e in sh.slices]) for s, sh in enumerate(m.shards)
        ]
        ctx.run_plans(OP, m, plans, progress)
        for p in plans:
            m = m.with_shard(p.shard, checkpoints=tuple(Checkpoint.from_dict(e) for e in p.checkpoints))
        ctx.commit(m)
        m = m.with_metrics(**ctx.evaluate(m), fit_seconds=time.time() - t0)
        ctx.commit(m)
        ctx.observer.finished(OP, m, plans, m.metrics, {}, None)
    except BaseException as e:
        ctx.observer.failed(OP, e)
        raise
    ctx.publish(m, run_id=ctx.observer.run_id)  # the first version of the ensemble as a registered pyfunc model
    return m


def _train_start(ctx, m: Manifest, start) -> Manifest:
    """The stage-0 checkpoint every shard starts from (`sisa.ops.base`), trained in this process."""
    import torch

    if start.empty or m.base is not None:  # with model.encoder it was trained before the slices were written
        return m
    if start.X is not None and not start.checked:  # beside a streamed Parquet source: checked only now
        startops.check_streamed(ctx, m, start)
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):
        threads = torch.get_num_threads()
        try:
            base, _ = startops.build(ctx, ctx.storage(), ctx.spec(m), start, m.id_kind)
        finally:
            torch.set_num_threads(threads)
    m = dataclasses.replace(m, base=base)
    return m.with_metrics(base_seconds=time.time() - t0, base_rows=base.rows)


def _check_gpus(ctx) -> None:
    """In-process training runs in this process: with resources.num_gpus it needs a GPU here (on Ray, the
    workers' nodes need one, and Ray only places shards where the GPUs are)."""
    if ctx.config.resources.num_gpus > 0 and ctx.executor_name == "inprocess":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"resources.num_gpus is {ctx.config.resources.num_gpus} but this process sees no CUDA GPU and the "
                "executor is inprocess; set resources.num_gpus: 0, or use the ray executor on a cluster with GPUs",
                problems=["resources.num_gpus: no GPU for the inprocess executor"],
            )


def _num_classes(ctx, max_label: int, input_shape) -> int:
    """data.num_classes, or the largest label + 1, filled into ``ctx.config`` (and so into the workdir's
    config.yaml): a deletion never changes the output space. Then checks the module against the data."""
    import torch

    from shards.models import check_module

    c = ctx.config
    num_classes = c.given_num_classes or max_label + 1
    if max_label >= num_classes:
        raise DataError(
            f"labels go up to {max_label} but data.num_classes is {num_classes}; labels are the integers "
            f"0..{num_classes - 1}: fix the labels or raise data.num_classes"
        )
    if c.data.num_classes != num_classes:
        ctx.config = c.with_num_classes(num_classes)
    optim = {k: getattr(c.training, k) for k in ("optimizer", "lr", "weight_decay", "momentum", "lr_gamma")}
    with torch.random.fork_rng(devices=[]):
        check_module(c.model.name, dict(c.model.kwargs), optim, tuple(input_shape), num_classes)
    return num_classes


def _claim(ctx, storage) -> None:
    """A store outside the workdir (object store, shared mount) belongs to one workdir: purging would delete
    another's files. Warn on a versioned bucket, which would keep deleted rows as old versions."""
    wd = ctx.workdir
    if storage.local and not storage.root.startswith("file://"):  # the default: a store inside the workdir
        return
    storage.claim(hmac.new(wd.secret(), b"sisa-storage-owner", "sha256").hexdigest()[:32], str(wd.path))
    problem = storage.versioning_problem()
    if problem:
        warnings.warn(problem, stacklevel=4)


def _ingest(ctx, storage, source: str):
    """Partition a Parquet dataset out of core. On bad data, remove what it wrote; nothing else changes."""
    c = ctx.config
    wd = ctx.workdir
    eval_tmp = wd.path / ".eval-ingest.npy"
    wipe_stale_spills(wd.path)  # of a fit that was killed here (we hold the workdir lock)
    data_protocol = source.split("://", 1)[0] if "://" in source else "file"
    options = dict(c.storage.options) if data_protocol == storage.protocol and not storage.local else {}
    try:
        ing = ctx.executor.ingest(  # on Ray: Ray Data on the cluster; in process: one stream and a local spill
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
            risk_column=c.data.risk_column,
            placement=c.placement(),
            risk_classes=c.sharding.risk_classes,
        )
        return ing, _num_classes(ctx, ing.max_label, ing.input_shape), eval_tmp
    except BaseException:
        purge_unreferenced(storage, ctx.read_manifest() if wd.exists() else None)
        if eval_tmp.exists():
            eval_tmp.unlink()
        raise


def _write_eval(path, eval_set, kind) -> None:
    """The evaluation file (`sisa.evalfile`): (id, y, x) rows that `delete` can erase; rows of an
    ``eval_set`` given without ids are stored as (y, x), cannot be named, and a warning says so."""
    if eval_set is None:
        zero_and_remove(path)
        return
    X, y = eval_set[:2]
    ids = eval_set[2] if len(eval_set) > 2 else None
    data = evalfile.encode(X, y, ids, kind)
    evalfile.replace_zeroing(path, data) if path.exists() else write_atomic(path, data)


def _remove_partial(ctx, storage) -> None:
    purge_unreferenced(storage, None)
    for name in ("config.yaml", evalfile.NAME, ".eval-ingest.npy"):
        zero_and_remove(ctx.workdir.path / name)
