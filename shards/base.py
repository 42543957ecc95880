"""The start every shard shares: a pretrained state dict (``model.init``) and/or a model trained once on base
data (rows declared non-erasable), stored as one stage-0 checkpoint under ``base/``.

Stage 1 of every shard loads the start's weights only: the optimizer and scheduler begin fresh, as in
fine-tuning, so a user's scheduler horizon (`shards.spec.SisaContext.total_epochs`) still covers exactly the
shard's own stages. The base stage trains like a shard's stage 1 with its own epochs, as shard
`BASE_SHARD` (its seeds differ from every real shard's). A deletion never retrains it.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import replace

import numpy as np
import torch

from shards import training
from shards.errors import ConfigError, IntegrityError
from shards.spec import TrainSpec
from shards.storage import KEPT_PREFIX, Storage, sha256

BASE_SHARD = -1
PREFIX = KEPT_PREFIX


def start_name(kind: str, digest: str) -> str:
    return f"{PREFIX}{kind}-{digest[:12]}.pt"


def start_lineage(init_sha256: str | None, base_slice_sha256: str | None) -> str:
    """Digest of what the start was made of: the pretrained file and the base rows' slice file."""
    return hashlib.sha256(f"init:{init_sha256 or ''}/base:{base_slice_sha256 or ''}".encode()).hexdigest()


def load_init(data: bytes, want_sha256: str, where: str) -> dict:
    """A pretrained state dict as a stage-0 checkpoint. The digest is checked before anything is unpickled,
    and the file is then loaded with ``weights_only=True``: a state dict, or a dict holding one under
    ``state_dict`` (a Lightning or sisa checkpoint)."""
    got = sha256(data)
    if got != want_sha256.lower():
        raise IntegrityError(
            f"{where}: sha256 is {got} but model.init.sha256 says {want_sha256}; it was not loaded. Check that "
            "the file is the one you meant and put its sha256 (`sha256sum FILE`) into model.init.sha256",
            path=where,
        )
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise IntegrityError(f"{where} cannot be loaded safely as a state dict ({e})", path=where) from e
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(
            f"{where} holds no state dict (a mapping of parameter names to tensors); save one with "
            "torch.save(module.state_dict(), path)",
            problems=["model.init.uri: not a state dict"],
        )
    return stage0({k: v.detach().cpu().clone() for k, v in sd.items()}, 0, start_lineage(got, None))


def check_fits(spec: TrainSpec, ckpt: dict, where: str) -> None:
    """Refuse a start whose state dict does not fit the configured model (names and shapes)."""
    module = training.init_module(spec, BASE_SHARD)
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ConfigError(
            f"{where} does not fit model {spec.model!r} with input shape {list(spec.input_shape)} and "
            f"{spec.num_classes} classes: {' '.join(first[:3])[:400]}. Use a state dict of the same architecture",
            problems=["model.init.uri: state dict does not fit the model"],
        ) from None


def train_base(storage: Storage, spec: TrainSpec, rows: np.ndarray, start: dict | None, epochs: int, lineage: str):
    """Train the base rows once from ``start`` (None: the seed's fresh init) for ``epochs`` epochs; returns
    the stored checkpoint's (file, sha256, rows, lineage) entry and the stage's metrics."""
    one = replace(spec, epochs_per_stage=(epochs,))
    ckpt, metrics = training.run_stage(one, BASE_SHARD, 1, start, rows, lineage)
    return write_start(storage, stage0(ckpt["state_dict"], len(rows), lineage), "stage-00"), metrics


def write_start(storage: Storage, ckpt: dict, kind: str) -> dict:
    data = training.save_checkpoint(ckpt)
    name = start_name(kind, sha256(data))
    digest = storage.write(name, data)
    return {"file": name, "sha256": digest, "rows": ckpt["rows"], "lineage": ckpt["lineage"]}


def stage0(state_dict: dict, rows: int, lineage: str) -> dict:
    """A sisa checkpoint holding weights only: the stages that start from it begin with a fresh optimizer."""
    return {
        "format": training.FORMAT,
        "shard": BASE_SHARD,
        "stage": 0,
        "rows": rows,
        "lineage": lineage,
        "state_dict": state_dict,
        "optimizers": [],
        "schedulers": [],
    }


def write_rows(storage: Storage, rows: np.ndarray) -> dict:
    """Store the base rows (the row schema of `shards.schema`) once, content-addressed: their ids let
    `delete` recognise a base row, and the file's digest goes into the start's lineage."""
    from shards.schema import encode_rows

    data = encode_rows(rows)
    digest = sha256(data)
    name = f"{PREFIX}rows-{digest[:12]}.npy"
    storage.write(name, data)
    return {"file": name, "sha256": digest, "rows": int(len(rows))}
