"""Benchmark sizes, the synthetic timing workload and the SISA configs built from them.

The timing workload is sklearn's make_classification (10 informative of 40 features, 4 classes,
class_sep 1, 2% label noise), so that shards, the ensemble and one monolithic model all make mistakes,
with an MLP large enough that training dominates start-up: at the ``full`` size one ensemble fit on one
worker takes about a minute on a 2-core machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Size:
    name: str
    rows: int  # training rows of the timing workload
    eval_rows: int
    hidden: tuple[int, ...] = (256, 256)
    epochs: int = 20  # e: the paper's schedule gives each of R stages 2e/(R+1) epochs
    batch_size: int = 128
    lr: float = 1e-3
    features: int = 40
    classes: int = 4
    shards: int = 8
    slices: int = 4
    batch_ks: tuple[int, ...] = (1, 4, 16, 64)
    plain_loop_shards: int = 4  # shards the hand-written loop retrains (scaled to the whole ensemble)
    tracked_deletions: int = 2  # after one warm-up deletion that creates the MLflow store
    inference_rows: tuple[int, ...] = (1, 64, 1000)  # plus the evaluation set
    sweep_shards: tuple[int, ...] = (1, 2, 5, 10, 20)
    digits_seeds: tuple[int, ...] = (0, 1, 2)
    synthetic_seeds: tuple[int, ...] = (0,)
    sweep_overrides: dict = field(default_factory=dict)  # {"digits": {...}, "synthetic": {...}} config overrides
    precision: str = "32-true"  # training.precision of the timing workload's fits (run.py --precision)


SIZES = {
    "full": Size("full", rows=180_000, eval_rows=8_000),
    "quick": Size(
        "quick",
        rows=24_000,
        eval_rows=2_000,
        epochs=10,
        batch_ks=(1, 4, 16),
        plain_loop_shards=2,
        tracked_deletions=1,
        sweep_shards=(1, 5, 20),
        digits_seeds=(0,),
    ),
    "smoke": Size(
        "smoke",
        rows=1_200,
        eval_rows=300,
        hidden=(16,),
        epochs=3,
        batch_size=32,
        shards=3,
        slices=2,
        batch_ks=(1, 4),
        plain_loop_shards=1,
        tracked_deletions=1,
        inference_rows=(1, 64),
        sweep_shards=(1, 2),
        digits_seeds=(0,),
        sweep_overrides={
            "digits": {"training": {"epochs": 3}},
            "synthetic": {"data": {"synthetic": {"n_samples": 600}}, "training": {"epochs": 2}},
        },
    ),
}


def make_data(size: Size, seed: int = 0):
    """(X, y, ids) for training and (X, y) for evaluation; ids are integers."""
    from sklearn.datasets import make_classification

    X, y = make_classification(
        n_samples=size.rows + size.eval_rows,
        n_features=size.features,
        n_informative=10,
        n_redundant=0,
        n_classes=size.classes,
        class_sep=1.0,
        flip_y=0.02,
        random_state=seed,
    )
    X = X.astype(np.float32)
    ids = np.arange(size.rows, dtype=np.int64)
    return (X[: size.rows], y[: size.rows], ids), (X[size.rows :], y[size.rows :])


def sisa_config(size: Size, workers: int, shards: int | None = None, slices: int | None = None, name="bench") -> dict:
    """The ensemble config of the timing workload on ``workers`` Ray workers (tracking off)."""
    return {
        "name": name,
        "seed": 0,
        "sharding": {"shards": shards or size.shards, "slices": slices or size.slices},
        "model": {"name": "mlp", "kwargs": {"hidden": list(size.hidden)}},
        "training": {
            "epochs": size.epochs,
            "schedule": "paper",
            "batch_size": size.batch_size,
            "lr": size.lr,
            "precision": size.precision,
        },
        "cluster": {"executor": "ray", "max_workers": workers},
        "tracking": {"enabled": False},
    }


def warmup_config(size: Size, workers: int) -> dict:
    """A tiny fit that starts ``workers`` warm Ray workers (torch and Lightning imported) before timing."""
    cfg = sisa_config(size, workers, shards=max(2, workers), slices=2, name="warmup")
    cfg["training"]["epochs"] = 1
    return cfg


def shipped_config(name: str, size: Size, shards: int, seed: int, workers: int = 2) -> dict:
    """configs/<name>.yaml with S shards and the given seed, tracking off, on ``workers`` Ray workers."""
    from sisa.config import load_config

    cfg = load_config(ROOT / "configs" / f"{name}.yaml").model_dump(mode="json")
    cfg["sharding"]["shards"] = shards
    cfg["seed"] = seed
    cfg["tracking"] = {"enabled": False}
    cfg["cluster"] = {**cfg["cluster"], "executor": "ray", "max_workers": workers}
    for section, values in size.sweep_overrides.get(name, {}).items():
        cfg[section] = _merge(cfg[section], values)
    return cfg


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
