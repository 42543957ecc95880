"""APPROXIMATE unlearning by gradient ascent on ONE monolithic model: a baseline for comparison only.

NOT EXACT. After gradient ascent the model is not the model trained without the rows, and nothing here
certifies that anything was forgotten. This is never a deletion path of `SisaEnsemble`; the membership
audit (`sisa.audit.mia`, `sisa audit --baseline`) runs it next to the exact ensemble so that users can see the
difference in cost, accuracy and membership-inference signal on the deleted rows.

The recipe is the common one: train one model on all rows (the ensemble's model and optimizer settings,
``training.epochs`` epochs), then take optimizer steps that *increase* the cross-entropy of the rows to forget,
stopping as soon as their mean loss reaches the mean loss of rows the model never saw (``target_loss``).
The ascent uses Adam: on memorised rows the gradients are tiny and plain SGD barely moves.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from shards import training

LABEL = "approximate: gradient ascent on a monolithic model (NOT exact unlearning)"


@dataclass
class ApproxResult:
    label: str
    train_rows: int
    forget_rows: int
    train_sample_epochs: int  # training the monolithic model on all rows
    unlearn_sample_gradients: int  # rows x gradient steps of the ascent
    retrain_sample_epochs: int  # what exact unlearning of the monolithic model (a full retrain) would cost
    train_seconds: float
    unlearn_seconds: float
    ascent_steps: int
    reached_target: bool
    forget_loss_before: float
    forget_loss_after: float
    target_loss: float

    def to_dict(self) -> dict:
        return asdict(self)


def plain_spec(spec, epochs: int):
    """The ensemble's TrainSpec for one model trained in a single stage of ``epochs`` epochs."""
    return replace(spec, epochs_per_stage=(int(epochs),))


def train_plain(spec, X: np.ndarray, y: np.ndarray, key: int) -> tuple[torch.nn.Module, float]:
    """Train one model outside the ensemble through the same training code (seeded by ``key``)."""
    rows = np.zeros(len(y), dtype=[("y", np.int64), ("x", np.float32, X.shape[1:])])
    rows["y"], rows["x"] = y, X
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        try:
            ckpt, _ = training.run_stage(spec, key, 1, None, rows, lineage="")
        finally:
            torch.set_num_threads(threads)
        module = training.init_module(spec, key)
    module.load_state_dict(ckpt["state_dict"])
    return module.eval(), time.perf_counter() - t0


@torch.no_grad()
def proba(module: torch.nn.Module, X: np.ndarray, batch: int = 8192) -> np.ndarray:
    module.eval()
    out = [
        module(torch.from_numpy(np.ascontiguousarray(X[i : i + batch]))).softmax(-1) for i in range(0, len(X), batch)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def _mean_loss(module, X: torch.Tensor, y: torch.Tensor) -> float:
    module.eval()
    return float(torch.nn.functional.cross_entropy(module(X), y))


def gradient_ascent(
    module: torch.nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    target_loss: float,
    lr: float,
    batch_size: int,
    max_steps: int = 500,
    seed: int = 0,
) -> tuple[int, bool, float]:
    """Ascend the loss of (X, y) until its mean reaches ``target_loss``; returns (steps, reached, seconds)."""
    Xt, yt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))
    opt = torch.optim.Adam(module.parameters(), lr=lr)  # scale-free steps: the loss of memorised rows is ~0
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    steps = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while steps < max_steps and _mean_loss(module, Xt, yt) < target_loss:
            idx = torch.randperm(len(yt), generator=g)[:batch_size]
            module.train()
            opt.zero_grad(set_to_none=True)
            loss = -torch.nn.functional.cross_entropy(module(Xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            steps += 1
    module.eval()
    return steps, _mean_loss(module, Xt, yt) >= target_loss, time.perf_counter() - t0


def refuse_encoder(m, what: str) -> None:
    """The membership attacks and the approximate baseline read raw rows; with ``model.encoder`` the slices
    hold features, so they do not run yet (the retrain check and the byte-level checks do)."""
    if getattr(m, "encoder", None) is not None:
        from shards.errors import ConfigError

        raise ConfigError(
            f"the {what} does not yet support model.encoder (the slices hold the encoder's features, not rows); "
            "run `sisa audit` without --mia / the baseline, or train without model.encoder",
            problems=[f"model.encoder: no {what}"],
        )


def run_baseline(
    ctx,
    m,
    train: tuple[np.ndarray, np.ndarray],
    forget: tuple[np.ndarray, np.ndarray],
    reference: tuple[np.ndarray, np.ndarray],
    lr: float | None = None,
    max_steps: int = 500,
) -> tuple[ApproxResult, torch.nn.Module, torch.nn.Module]:
    """Train a monolithic model (the ensemble's model and optimizer, from ``ctx`` and manifest ``m``) on ``train`` (which includes ``forget``), then unlearn ``forget`` by
    gradient ascent until its loss matches the loss on ``reference`` rows the model never saw.

    Returns the result and the models before and after the ascent. NOT exact unlearning.
    """
    import copy

    refuse_encoder(m, "approximate baseline")
    c = ctx.config
    spec = plain_spec(ctx.spec(m), c.training.epochs)
    X, y = train
    before, train_s = train_plain(spec, X, y, key=1_000_000)
    after = copy.deepcopy(before)
    Xr, yr = reference
    target = _mean_loss(before, torch.from_numpy(Xr.astype(np.float32)), torch.from_numpy(yr.astype(np.int64)))
    Xf, yf = forget
    f_before = _mean_loss(before, torch.from_numpy(Xf.astype(np.float32)), torch.from_numpy(yf.astype(np.int64)))
    steps, reached, secs = gradient_ascent(
        after, Xf, yf, target, lr or c.training.lr, min(c.training.batch_size, len(yf)), max_steps, seed=c.seed
    )
    f_after = _mean_loss(after, torch.from_numpy(Xf.astype(np.float32)), torch.from_numpy(yf.astype(np.int64)))
    res = ApproxResult(
        label=LABEL,
        train_rows=len(y),
        forget_rows=len(yf),
        train_sample_epochs=len(y) * c.training.epochs,
        unlearn_sample_gradients=steps * min(c.training.batch_size, len(yf)),
        retrain_sample_epochs=(len(y) - len(yf)) * c.training.epochs,
        train_seconds=train_s,
        unlearn_seconds=secs,
        ascent_steps=steps,
        reached_target=reached,
        forget_loss_before=f_before,
        forget_loss_after=f_after,
        target_loss=target,
    )
    return res, before, after
