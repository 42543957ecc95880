"""The ensemble as an MLflow pyfunc model: what `Tracker` logs and registers for each ensemble version.

A version is a pyfunc model saved with ``loader_module="sisa.tracking.pyfunc"`` (no pickle, and no code
in the artifact: MLflow imports this installed module and calls `_load_pyfunc`), plus its data:
``ensemble.json`` (architecture, input shape, classes, aggregation, and the digests that bind it to the
deployed checkpoints) and ``shards/<s>.pt``, one active sub-model's state dict per file, read back with
``torch.load(weights_only=True)``. A new version of a local store hard-links the files of the shards the
previous version already holds (same checkpoint) instead of writing them again. Loading it needs ``sisa``
importable (and the user's model package, for a model given by import path):

    model = mlflow.pyfunc.load_model("models:/<name>@current")
    model.predict(X)                       # labels, equal to SisaEnsemble.predict(X)
    model.predict(X, params={"proba": True})  # class probabilities, equal to predict_proba

Every file is verified before it is used (`sisa.tracking.digest.check_model_dir`): a changed weight, an
edited field, a file added to the data or an MLmodel that names other code raises `IntegrityError`.
`load_model(uri, tracking_uri)` also checks every file against the digests the registry recorded at
publish time, before MLflow reads the artifact at all.

The input is an array of shape (n, *input_shape), or a DataFrame whose columns are matched to the training
features by name (for an ensemble fitted from arrays, which has no names: one numeric column per feature,
rows flattened). No row of the training data is ever written here: the signature is built from shapes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from sisa.tracking import adapter
from sisa.tracking.digest import (
    DATA,
    ENCODER,
    ENCODER_FILE,
    FORMAT,
    LOADER_MODULE,
    LOADER_SHA256,
    META,
    check_model_dir,
    file_sha256,
    meta_digest,
    mlflow_files,
    shard_file,
    state_dict_sha256,
)

ARTIFACT = "ensemble"


def fingerprint(ctx, m) -> str:
    """Identity of an ensemble version: the active shards' final checkpoints and the aggregation."""
    c = ctx.config.aggregation
    parts = [f"{s}:{m.shards[s].final.sha256}" for s in ctx.active_shards(m)]
    parts.append(f"agg:{c.method}:{c.weights}")
    if m.encoder is not None:
        parts.append(f"encoder:{m.encoder.sha256}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def export(ctx, m, directory: Path, reuse: dict | None = None, present: dict | None = None) -> dict:
    """Write ensemble.json and one weights file per active shard of manifest ``m`` into ``directory``.
    ``reuse``: {shard: (file, file sha256, state-dict sha256)} of a previous version's weights file for
    the same checkpoint, hard-linked instead of written (written afresh when the link fails or the linked
    file's sha256 is not the recorded one: a changed byte is never carried into a new version).
    ``present``: what `link_shards` already put in ``directory``; a file whose checkpoint ``m`` no longer
    deploys, or that changed since (hashed again when its stat differs), is unlinked and written afresh."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "shards").mkdir(exist_ok=True)
    active = ctx.active_shards(m)
    spec = ctx.spec(m)
    c = ctx.config
    files, state_dicts = {}, {}
    present = dict(present or {})
    for s in set(present) - set(active):  # a link to the live version's file: zeroed when that one is purged
        (directory / shard_file(s)).unlink(missing_ok=True)
    for s in active:
        rel = shard_file(s)
        if s in present and present[s][0] == m.shards[s].final.sha256 and _unchanged(directory / rel, present[s]):
            files[rel], state_dicts[str(s)] = present[s][1], present[s][2]
            continue
        if s in present:
            (directory / rel).unlink(missing_ok=True)
        if s in (reuse or {}) and _link(reuse[s][0], directory / rel, reuse[s][1]):
            files[rel], state_dicts[str(s)] = reuse[s][1], reuse[s][2]
            continue
        sd = ctx.state_dict(s, m)
        files[rel], state_dicts[str(s)] = _save(sd, directory / rel), state_dict_sha256(sd)
    meta = {
        "format": FORMAT,
        "name": c.name,
        "model": spec.model,
        "model_kwargs": dict(spec.model_kwargs),
        "optim": dict(spec.optim),
        "input_shape": list(m.input_shape),
        "feature_names": None if m.feature_names is None else list(m.feature_names),
        "drop_columns": [c.data.id_column, c.data.label_column],
        "num_classes": spec.num_classes,
        "aggregation": {"method": c.aggregation.method, "weights": c.aggregation.weights},
        "shards": active,
        "checkpoints": {str(s): m.shards[s].final.sha256 for s in active},
        "state_dicts": state_dicts,
        "files": files,
        "config_hash": m.config_hash,
        "fingerprint": fingerprint(ctx, m),
        "loader_sha256": LOADER_SHA256,
    }
    if m.encoder is not None:  # model.encoder: the frozen body every row goes through before the heads
        e = m.encoder
        meta["encoder"] = {
            "model_kwargs": dict(c.model.kwargs),
            "width": e.width,
            "sha256": e.sha256,
            "module": e.module,
            "seed": c.seed,  # a user's module is built under it (`shards.encoder.user`), as in the workdir
            "probe": e.probe,
        }
        sd = ctx.encoder(m).state_dict()  # e.module: a user's encoder by import path (None: the start's body)
        files[ENCODER_FILE], state_dicts[ENCODER] = _save(sd, directory / ENCODER_FILE), state_dict_sha256(sd)
    root = directory.parents[1]  # the model folder: ``directory`` is its DATA folder
    if (root / "MLmodel").exists():
        meta["mlflow_files"] = mlflow_files(root)
    meta["digest"] = meta_digest(meta)
    (directory / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return meta


def _save(state_dict: dict, path: Path) -> str:
    """``torch.save`` to ``path``; returns the sha256 of the bytes written, hashed in memory (not read back)."""
    import io

    buf = io.BytesIO()
    torch.save(state_dict, buf)
    data = buf.getvalue()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def link_shards(directory: Path, reuse: dict, checkpoints: dict) -> dict:
    """Hard-link the ``reuse`` weights files (see `export`) into ``directory`` ahead of `export`, while the
    retrained shards train; returns ``present`` for `export`: {shard: (checkpoint sha256, file sha256,
    state-dict sha256, the file's stat when it was hashed)} of each file linked (``checkpoints``: {shard:
    the checkpoint sha256 it holds})."""
    (directory / "shards").mkdir(parents=True, exist_ok=True)
    return {
        s: (checkpoints[s], f, sd, _stat(directory / shard_file(s)))
        for s, (src, f, sd) in sorted(reuse.items())
        if _link(src, directory / shard_file(s), f)
    }


def _stat(path: Path) -> tuple:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _unchanged(path: Path, present: tuple) -> bool:
    """The linked file is still what was hashed: the same stat (a write moves the change time), else the
    same sha256 again."""
    try:
        return _stat(path) == present[3] or file_sha256(path) == present[1]
    except OSError:
        return False


def _link(src: Path, dst: Path, sha256: str) -> bool:
    """Hard-link ``src`` at ``dst`` if the linked inode's content is ``sha256`` (hashed after linking, so
    what is checked is what the new version holds); else leave nothing at ``dst``."""
    try:
        os.link(src, dst)
        if file_sha256(dst) == sha256:
            return True
    except OSError:  # gone, unreadable, or another file system
        pass
    dst.unlink(missing_ok=True)
    return False


def signature():
    """Signature from shapes only (never from rows). The input is not declared as a tensor spec, which MLflow
    would enforce strictly (float32 only, rejecting float64 arrays and DataFrames); `SisaPyfunc.predict`
    checks it instead, as `SisaEnsemble.predict` does. Its shape is recorded in the model's metadata."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=None,
        outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),
        params=ParamSchema([ParamSpec("proba", "boolean", False)]),
    )


def requirements() -> list[str]:
    import mlflow

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]


def save(ctx, m, path: Path, mlflow_model=None, reuse: dict | None = None) -> dict:
    """Save the manifest's ensemble as a pyfunc model directory at ``path`` (which must not exist, or be
    empty): MLflow's files (`skeleton`), then the data (`export`), weights written in place, never copied."""
    skeleton(path, mlflow_model)
    return export(ctx, m, Path(path) / DATA, reuse)


def skeleton(path: Path, mlflow_model=None) -> None:
    """MLflow's part of a model directory at ``path`` (MLmodel, environment files) and its data folder, with
    a placeholder ``ensemble.json`` that `export` overwrites: none of it depends on the weights, so a
    deletion writes it while its shards retrain (`sisa.tracking.registry.stage`)."""
    import tempfile

    import mlflow.pyfunc

    with tempfile.TemporaryDirectory(prefix="sisa-skeleton-") as tmp:
        (Path(tmp) / ARTIFACT).mkdir()
        (Path(tmp) / ARTIFACT / META).write_text("{}")
        with adapter.quiet():
            mlflow.pyfunc.save_model(
                path=str(path),
                loader_module=LOADER_MODULE,  # the installed module: no code is saved in the artifact
                data_path=str(Path(tmp) / ARTIFACT),
                signature=signature(),
                pip_requirements=requirements(),
                mlflow_model=mlflow_model,
            )


def _load_pyfunc(data_path: str, model_config=None):
    """MLflow's entry point (``loader_module``): verify the model directory, then build the ensemble."""
    from shards.errors import IntegrityError

    data = Path(data_path)
    if not data.as_posix().endswith("/" + DATA):
        raise IntegrityError(f"{data}: MLmodel points the sisa loader at {data.name!r}, not {DATA!r}", path=str(data))
    meta, weights = check_model_dir(data.parents[1])
    return SisaPyfunc(meta, weights)


def load_model(model_uri: str, tracking_uri: str | None = None):
    """``mlflow.pyfunc.load_model`` for a registered sisa ensemble (``models:/<name>@current`` or
    ``models:/<name>/<version>``), with every artifact file checked against the digests recorded in the
    registry at publish time *before* MLflow reads any of it (MLmodel included)."""
    import tempfile

    import mlflow.pyfunc

    from shards.errors import IntegrityError
    from sisa.tracking import adapter
    from sisa.tracking.digest import check_files

    client = adapter.client(tracking_uri)
    name, _, ref = model_uri.removeprefix("models:/").partition("@")
    if ref:
        mv = client.get_model_version_by_alias(name, ref)
    else:
        name, _, version = name.partition("/")
        mv = client.get_model_version(name, version)
    if mv.tags.get("sisa.format") != str(FORMAT) or "sisa.files" not in mv.tags:
        raise IntegrityError(
            f"{model_uri} (version {mv.version}) carries no sisa digests: it was not published by this sisa. "
            "Publish it again with `sisa publish --workdir WORKDIR`",
            path=model_uri,
        )
    with tempfile.TemporaryDirectory(prefix="sisa-model-") as tmp:
        local = adapter.download(client, client.tracking_uri, mv, tmp)
        check_files(Path(local), json.loads(mv.tags["sisa.files"]), where=f"{model_uri} (version {mv.version})")
        with adapter.quiet():
            return mlflow.pyfunc.load_model(local)


class SisaPyfunc:
    """The loaded pyfunc model: the same Aggregator over the same sub-models as `SisaEnsemble.predict`.
    Built only by `_load_pyfunc`, from files `check_model_dir` verified."""

    def __init__(self, meta: dict, weights: dict):
        from shards.models import build_module
        from sisa.aggregate import Aggregator

        modules, enc, encoder = {}, meta.get(ENCODER), None
        shape = meta["input_shape"] if enc is None else [enc["width"]]  # the heads' input: the encoder's features
        with torch.random.fork_rng(devices=[]):
            for s in meta["shards"]:
                m = build_module(meta["model"], meta["model_kwargs"], meta["optim"], shape, meta["num_classes"])
                m.load_state_dict(weights[str(s)])
                modules[s] = m.eval()
            if enc is not None and enc.get("module"):
                from shards.encoder import user

                encoder = user(enc["module"], meta["input_shape"], None, enc.get("seed", 0), enc["module"])
                encoder.load_state_dict(weights[ENCODER])
            elif enc is not None:
                full = build_module(
                    meta["model"], enc["model_kwargs"], meta["optim"], meta["input_shape"], meta["num_classes"]
                )
                encoder = full.net.layers[:-1]
                encoder.load_state_dict(weights[ENCODER])
                encoder.eval().requires_grad_(False)
        if encoder is not None:
            from shards.encoder import check_probe

            check_probe(encoder, meta["input_shape"], enc.get("probe"), enc.get("module") or "the model's encoder")
        agg = meta["aggregation"]
        self.meta = meta
        self.aggregator = Aggregator(modules, meta["num_classes"], agg["method"], agg["weights"], encoder=encoder)

    def predict(self, model_input, params: dict | None = None):  # an array or a DataFrame
        from sisa.aggregate import decide
        from sisa.data import check_features, is_table, select_features

        X = model_input
        if is_table(X) and self.meta.get("feature_names"):  # matched to the training features by name
            X = select_features(X, self.meta["feature_names"], *self.meta["drop_columns"])
        elif hasattr(X, "to_numpy"):  # a DataFrame of an ensemble fitted from arrays: one column per feature
            X = X.to_numpy()
        X = np.asarray(X)
        shape = tuple(self.meta["input_shape"])
        if X.ndim == 2 and len(shape) > 1 and X.shape[1] == int(np.prod(shape)):
            X = X.reshape(len(X), *shape)
        proba = self.aggregator.predict_proba(check_features(X, shape))
        return proba if (params or {}).get("proba") else decide(proba)
