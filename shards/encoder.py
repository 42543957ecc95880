"""The frozen encoder: ``model.encoder: base``, the shared start's body (every layer of the built-in MLP
but the last), or a user's module by import path (`user`) with its own digest-checked weights. Its
features are computed once per row, one row at a time (a row's features never depend on which other rows
were encoded with it, so a refit without some rows encodes the others to the same bits), and stored as
the slices' rows. The shards train heads on them: the MLP's last layer (`head_spec`) starting from the
start's own, or, for a user's encoder, the configured MLP on the features.
"""

from __future__ import annotations

import hashlib
import inspect
import io
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from shards import base, training
from shards.errors import ConfigError, DataError, IntegrityError
from shards.models import import_target
from shards.spec import TrainSpec, derive_seed
from shards.storage import Storage

PREFIX = "net.layers."
HEAD = PREFIX + "1."  # the head is MLP(hidden=[]): Flatten, then this Linear


def head_spec(spec: TrainSpec, width: int) -> TrainSpec:
    """What the shards train: the built-in MLP without hidden layers, on ``width`` features."""
    return replace(spec, input_shape=(width,), model_kwargs={**spec.model_kwargs, "hidden": []})


def _last_layer(state_dict: dict) -> int:
    return max(int(k[len(PREFIX) :].split(".")[0]) for k in state_dict if k.startswith(PREFIX))


def body(spec: TrainSpec, state_dict: dict) -> nn.Module:
    """The frozen body of the full model ``spec`` with the start's weights, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        module = training.init_module(spec, base.BASE_SHARD)
    module.load_state_dict(state_dict)
    layers = module.net.layers[:-1].eval()
    layers.requires_grad_(False)
    return layers


def width(encoder: nn.Module) -> int:
    if hasattr(encoder, "sisa_width"):  # a user's encoder (`user`)
        return encoder.sisa_width
    return [m for m in encoder.modules() if isinstance(m, nn.Linear)][-1].out_features


@torch.no_grad()
def encode(encoder: nn.Module, X: np.ndarray) -> np.ndarray:
    """(n, width) float32 features of ``X``, one row per forward pass on one thread (the same bits for a
    row whatever rows come with it)."""
    X = torch.from_numpy(np.array(X, dtype=np.float32, order="C", copy=True))
    out = np.empty((len(X), width(encoder)), np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(len(X)):
            out[i] = encoder(X[i : i + 1])[0].numpy()
    finally:
        torch.set_num_threads(threads)
    return out


def encode_finite(encoder: nn.Module, X: np.ndarray, what: str) -> np.ndarray:
    """`encode`, refusing features that are not finite (named by row index only, never by value or id)."""
    out = encode(encoder, X)
    finite = np.isfinite(out).all(1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(
            f"model.encoder produced NaN or inf features for {len(bad)} of the {what} (first at row {bad[0]}); "
            "the rows themselves are finite: fix the encoder (or its weights) so that it maps them to finite "
            "features, or drop those rows",
            rows=bad[:10].tolist(),
        )
    return out


PROBE_ROWS = 8
PROBE_SEED = 20_140_003


def probe(encoder: nn.Module, input_shape) -> str:
    """The sha256 of the encoder's features (`encode`) of a fixed synthetic batch (seeded uniform rows in
    [-1, 1], no one's data): a module whose code changed since fit gives other bits."""
    rng = np.random.default_rng(PROBE_SEED)
    rows = rng.uniform(-1.0, 1.0, (PROBE_ROWS, *tuple(input_shape))).astype(np.float32)
    return hashlib.sha256(encode(encoder, rows).tobytes()).hexdigest()


def check_probe(encoder: nn.Module, input_shape, want: str | None, where: str) -> None:
    """Refuse an encoder whose `probe` differs from the one recorded at fit (None: recorded by an older sisa)."""
    if want is not None and probe(encoder, input_shape) != want:
        raise IntegrityError(
            f"{where}: the encoder module behaves differently than at fit: restore its code or refit "
            "(`sisa train --overwrite`); its features of a fixed synthetic probe batch are not those recorded at fit",
            path=where,
        )


def split_start(storage: Storage, spec: TrainSpec, entry: dict) -> tuple[dict, dict, nn.Module]:
    """From the start checkpoint ``entry`` (the full model): the head start every shard's stage 1 loads (its
    last layer, stored as its own stage-0 checkpoint), the encoder's record, and the encoder itself."""
    ckpt = training.load_checkpoint(storage.read(entry["file"], entry["sha256"]), storage.describe(entry["file"]))
    sd = ckpt["state_dict"]
    last = f"{PREFIX}{_last_layer(sd)}."
    head = {HEAD + k[len(last) :]: v.clone() for k, v in sd.items() if k.startswith(last)}
    head_entry = base.write_start(storage, base.stage0(head, ckpt["rows"], ckpt["lineage"]), "head")
    encoder = body(spec, sd)
    return head_entry, {"file": entry["file"], "sha256": entry["sha256"], "width": width(encoder)}, encoder


def load(storage: Storage, spec: TrainSpec, file: str | None, sha256: str | None, module: str | None = None):
    """The encoder a manifest names (digest-checked, ``weights_only``); ``spec`` is the full model's."""
    data = None if file is None else storage.read(file, sha256)
    if module is not None:
        return user(module, spec.input_shape, data, spec.seed, storage.describe(file) if file else module)
    return body(spec, training.load_checkpoint(data, storage.describe(file))["state_dict"])


def user(target: str, input_shape, weights: bytes | None, seed: int, where: str) -> nn.Module:
    """A user's encoder: ``target`` ("pkg.mod:Factory") called with ``input_shape`` when it takes it (under a
    seed, so a module without weights is the same everywhere), its weights loaded strictly, frozen; it must
    map (n, *input_shape) rows to (n, width) features."""
    hint = "give an import path like 'mypkg.encoders:Encoder' that is importable here"
    factory = import_target(target, "model.encoder.module", "model.encoder.module", hint)
    takes = "input_shape" in inspect.signature(factory).parameters
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "encoder") % (1 << 62))
        module = factory(input_shape=tuple(input_shape)) if takes else factory()
    if not isinstance(module, nn.Module):
        raise ConfigError(
            f"model.encoder.module {target!r} returned a {type(module).__name__}, not a torch.nn.Module",
            problems=["model.encoder.module: not an nn.Module"],
        )
    if weights is not None:
        try:
            sd = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
            module.load_state_dict(sd.get("state_dict", sd) if isinstance(sd, dict) else sd)
        except Exception as e:
            raise IntegrityError(f"{where} is not a state dict of {target!r} ({e})"[:600], path=where) from e
    module.eval().requires_grad_(False)
    with torch.no_grad():
        out = module(torch.zeros((1, *tuple(input_shape))))
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"model.encoder.module {target!r} maps a row of shape {tuple(input_shape)} to {got}; it must return "
            "features of shape (batch, width)",
            problems=["model.encoder.module: output is not (batch, width)"],
        )
    module.sisa_width = int(out.shape[1])
    return module
