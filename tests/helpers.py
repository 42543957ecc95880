"""Helpers shared by the test modules (fixtures live in conftest.py). No test module imports another."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent  # support modules (usermodel.py, resume_worker.py ...) live here
REPO = TESTS.parent


def tiny_config(**over) -> dict:
    """A small config whose full fit takes about a second."""
    cfg = {
        "name": "tiny",
        "seed": 3,
        "sharding": {"shards": 3, "slices": 3},
        "model": {"name": "mlp", "kwargs": {"hidden": [16], "dropout": 0.1}},
        "training": {"epochs": 4, "batch_size": 16, "lr": 0.01, "lr_gamma": 0.9},
        "tracking": {"enabled": False},
        "cluster": {"executor": "inprocess"},
    }
    for key, val in over.items():
        if isinstance(val, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **val}
        else:
            cfg[key] = val
    return cfg


def tiny_data(n=240, features=6, classes=3, seed=0, str_ids=True):
    from sklearn.datasets import make_classification

    X, y = make_classification(
        n_samples=n, n_features=features, n_informative=4, n_redundant=0, n_classes=classes, random_state=seed
    )
    ids = np.array([f"u-{i}" for i in range(n)]) if str_ids else np.arange(1000, 1000 + n)
    return X.astype(np.float32), y, ids


def weights_equal(a, b) -> bool:
    """Every sub-model tensor identical (torch.equal) and the same set of active shards."""
    import torch

    if a.active_shards() != b.active_shards():
        return False
    for s in a.active_shards():
        sa, sb = a.load_shard_model(s).state_dict(), b.load_shard_model(s).state_dict()
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


def fit_ensemble(cfg, wd, X, y, ids, executor="inprocess"):
    """A fitted SisaEnsemble of ``cfg`` in ``wd``."""
    from sisa import SisaEnsemble

    return SisaEnsemble.from_config(cfg, wd, executor=executor).fit(X, y, ids=ids)


def without(X, y, ids, gone):
    """(X, y, ids) without the rows whose ids are in ``gone``: the data a deletion's reference fit trains on."""
    keep = ~np.isin(ids, list(gone))
    return X[keep], y[keep], ids[keep]


def checkpoint_hashes(ens) -> list[list[str]]:
    """Every shard's checkpoint digests, stage by stage: equal lists mean byte-identical checkpoints."""
    return [[c.sha256 for c in sh.checkpoints] for sh in ens.manifest.shards]


def store_files(ens) -> set[str]:
    """Every file in the ensemble's local store, relative to it (what `Manifest.referenced_files` names)."""
    root = ens.workdir.path / "store"
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def scan(root: Path, needles: list[bytes]) -> list[tuple[str, bytes]]:
    """Every (file under ``root``, needle) where the needle's bytes occur in the file."""
    hits = []
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            hits += [(str(p.relative_to(root)), n) for n in needles if n in data]
    return hits


def weight_needles(ens, shards) -> list[bytes]:
    """The largest tensor of each given shard's sub-model: present in a saved model iff that sub-model is."""
    out = []
    for s in shards:
        sd = ens.load_shard_model(s).state_dict()
        out.append(max(sd.values(), key=lambda t: t.numel()).numpy().tobytes())
    return out


def delete_killed_at(workdir, ids: list, point: str):
    """Open ``workdir`` in a new process and delete ``ids``, killed (SIGKILL) at crash point ``point``;
    returns the finished process."""
    import json
    import os
    import subprocess
    import sys

    code = "import json, sys; from sisa import SisaEnsemble; SisaEnsemble.open(sys.argv[1]).delete(json.loads(sys.argv[2]))"
    return subprocess.run(
        [sys.executable, "-c", code, str(workdir), json.dumps(list(ids))],
        env={**os.environ, "SISA_CRASH_AT": point},
        capture_output=True,
        text=True,
        cwd=REPO,
    )
