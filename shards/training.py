"""One shard's sliced training: stage r resumes from the state after stage r-1 and trains on slices 1..r.

Every stage goes through the same path, straight run or resume: build the module from its seed, load the
previous state (weights, optimizer, scheduler), train with a fresh Lightning Trainer (built-ins on the CPU:
the same steps without one, `shards.loop`), serialize. The data
order and the torch RNG are re-derived from (seed, shard, stage, epoch) at every epoch start, so nothing
else needs restoring and a resumed stage is bit-identical to a straight one.

A user's own LightningModule gets plain (x, y) batches, ``self.sisa_context`` (`shards.spec.SisaContext`)
before ``configure_optimizers``, and a Trainer that keeps ``self.log``: the values logged in each epoch go
into the stage metrics (``epochs[i]["logged"]``), which the driver logs to the shard's MLflow run.

Built-in modules (`SisaModule`) are fed `EpochChunks`: several whole batches per Lightning step, each
still its own optimizer step in the same order, so the updates are unchanged and Lightning's per-step
work is paid once per chunk (the framework stays within a few percent of a plain torch loop).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import threading
import time
import warnings
from typing import NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from shards import ckptfile, loop
from shards.errors import ConfigError, IntegrityError
from shards.models import SisaModule, build_module
from shards.spec import FP32, SisaContext, TrainSpec, derive_seed

FORMAT = 1
CHUNK_ROWS = 4096  # rows per Lightning step for built-in modules (whole batches, at least one) ...
CHUNK_BYTES = 16 << 20  # ... and at most this many bytes of features, so wide rows stay out of memory
# built-in modules on the CPU train in `shards.loop` (no Trainer); False: under Lightning (tests compare the two)
DIRECT = True
ACCURACY_ROWS = 1024  # train accuracy after each stage is measured on at most this many rows (every k-th)
# Lightning's info logs and the warnings sisa's own Trainer setup triggers are silenced while a stage trains,
# and only then: importing sisa changes no global warning or logging state.
_QUIET_LOGGERS = ("pytorch_lightning", "lightning.pytorch")
_QUIET_WARNINGS = (
    ".*does not have many workers.*",
    ".*barebones.*",
    ".*LeafSpec.*",
    # a per-epoch OneCycleLR / CyclicLR is what sisa recommends (see shards.spec.SisaContext)
    ".*scheduler is using 'interval': 'epoch'.*",
)
_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved: tuple[warnings.catch_warnings, list] | None = None


@contextlib.contextmanager
def quiet_training():
    """Silence Lightning's chatter for the duration of a stage, then restore the caller's warning filters
    and logger levels. Re-entrant and thread-safe: concurrent stages share one silenced period."""
    global _quiet_depth, _quiet_saved
    with _quiet_lock:
        if _quiet_depth == 0:
            caught = warnings.catch_warnings()
            caught.__enter__()
            for message in _QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message)
            loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
            _quiet_saved = (caught, [(lg, lg.level) for lg in loggers])
            for lg in loggers:
                lg.setLevel(logging.ERROR)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _quiet_saved is not None:
                caught, levels = _quiet_saved
                _quiet_saved = None
                for lg, level in levels:
                    lg.setLevel(level)
                caught.__exit__(None, None, None)


class _Rows(Dataset):
    def __init__(self, X: torch.Tensor, y: torch.Tensor):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, idx):
        return self.X[idx], self.y[idx]


class EpochBatches(Sampler):
    """Yields one index tensor per batch; the order is a function of (seed, shard, stage, epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int, shard: int, stage: int):
        self.n, self.batch_size = n, batch_size
        self.key = (seed, shard, stage)
        self.epoch = 0
        self._generator = torch.Generator()  # reseeded every epoch: one per sampler, not one per epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return -(-self.n // self.batch_size)

    def __iter__(self):
        g = self._generator.manual_seed(derive_seed(*self.key, self.epoch, "order"))
        perm = torch.randperm(self.n, generator=g)
        return iter(perm.split(self.batch_size))


class EpochChunks:
    """The batches of one epoch in `EpochBatches` order, ``per_step`` of them at a time, as
    ``([x_1..x_k], [y_1..y_k])``. Each batch is its own fresh tensor, as a DataLoader would give it
    (views into one gathered chunk are not 64-byte aligned, and alignment can change GEMM rounding)."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, sampler: EpochBatches, per_step: int):
        self.X, self.y, self.sampler, self.per_step = X, y, sampler, max(1, per_step)

    def __len__(self):
        return -(-len(self.sampler) // self.per_step)

    def __iter__(self):
        batches = list(iter(self.sampler))
        for i in range(0, len(batches), self.per_step):
            group = batches[i : i + self.per_step]
            yield [self.X[b] for b in group], [self.y[b] for b in group]


class _ExactResume(pl.Callback):
    """Restores optimizer/scheduler state, reseeds per epoch and records per-epoch metrics."""

    def __init__(self, spec: TrainSpec, shard: int, stage: int, opt_states, sched_states, sampler):
        self.spec, self.shard, self.stage = spec, shard, stage
        self.opt_states, self.sched_states, self.sampler = opt_states, sched_states, sampler
        self.epochs: list[dict] = []
        self._logged_upto = 0
        self._loss = 0.0
        self._batches = 0
        self._t0 = 0.0

    def on_train_start(self, trainer, pl_module):
        for opt, state in zip(trainer.optimizers, self.opt_states or []):
            opt.load_state_dict(state)
        for cfg, state in zip(trainer.lr_scheduler_configs, self.sched_states or []):
            cfg.scheduler.load_state_dict(state)

    def on_train_epoch_start(self, trainer, pl_module):
        self._take_logged(trainer)
        epoch = trainer.current_epoch
        loop.seed_torch(derive_seed(self.spec.seed, self.shard, self.stage, epoch, "torch"), self.spec.accelerator)
        self.sampler.set_epoch(epoch)
        self._loss, self._batches, self._t0 = 0.0, 0, time.perf_counter()
        self._correct, self._seen = 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if isinstance(outputs, dict) and "batches" in outputs:  # a chunk of batches (EpochChunks)
            self._loss += float(outputs["loss_sum"])
            self._batches += outputs["batches"]
            self._correct += int(outputs.get("correct", 0))
            self._seen += outputs.get("seen", 0)
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._loss += float(loss)
            self._batches += 1

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append(
            {
                "epoch": trainer.current_epoch,
                "loss": self._loss / max(1, self._batches),
                "seconds": time.perf_counter() - self._t0,
                "samples": self.sampler.n,
                # running accuracy over the epoch's batches, as they were trained (built-in models)
                **({"accuracy": self._correct / self._seen} if self._seen else {}),
            }
        )

    def _take_logged(self, trainer) -> None:
        """``self.log`` values of the epoch that just ended: Lightning reduces the epoch-level ones after the
        epoch-end hooks, so they are read at the next epoch's start (and at the end of training)."""
        if not self.epochs or trainer.barebones or self._logged_upto == len(self.epochs):
            return
        self._logged_upto = len(self.epochs)
        logged = {}
        for name, value in trainer.callback_metrics.items():
            name = re.sub(r"[^\w\-./ :]", "_", str(name))  # a valid MLflow metric name
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                logged[name] = float(value)
            elif isinstance(value, (int, float)):
                logged[name] = float(value)
        if logged:
            self.epochs[-1]["logged"] = logged

    def on_train_end(self, trainer, pl_module):
        self._take_logged(trainer)
        self.opt_states = [opt.state_dict() for opt in trainer.optimizers]
        self.sched_states = [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs]


def init_module(spec: TrainSpec, shard: int) -> pl.LightningModule:
    loop.seed_torch(derive_seed(spec.seed, shard, "init"), spec.accelerator)
    return build_module(spec.model, spec.model_kwargs, spec.optim, spec.input_shape, spec.num_classes)


def load_checkpoint(data: bytes, where: str = "checkpoint") -> dict:
    """A stage checkpoint from its file's bytes (`shards.ckptfile`, or torch's format read with
    ``weights_only``: older workdirs, and checkpoints holding values the header cannot describe)."""
    try:
        if ckptfile.is_own(data):
            ckpt = ckptfile.decode(data)
        else:
            ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, a pickle with forbidden globals, a malformed header, ...
        raise IntegrityError(f"{where} cannot be loaded safely ({e})", path=where) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise IntegrityError(f"{where} is not a sisa checkpoint of format {FORMAT}", path=where)
    return ckpt


def save_checkpoint(ckpt: dict) -> bytes:
    try:
        return ckptfile.encode(ckpt)
    except Exception:  # `ckptfile.Unsupported`, or anything else its header cannot hold: torch's format holds it
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        return buf.getvalue()


def run_stage(
    spec: TrainSpec, shard: int, stage: int, prev: dict | None, rows: np.ndarray, lineage: str
) -> tuple[dict, dict]:
    """Train stage ``stage`` (1-based) on ``rows`` (slices 1..stage) from ``prev`` (None = fresh init).

    Returns the new checkpoint dict and the stage's metrics.
    """
    torch.set_num_threads(spec.threads)
    module = init_module(spec, shard)
    opt_states, sched_states = None, None
    if prev is not None:
        module.load_state_dict(prev["state_dict"])
        # copies: torch's load_state_dict keeps the tensors it is given, and training updates them in place
        opt_states, sched_states = _cpu(prev["optimizers"]) or None, prev["schedulers"] or None
    epochs = spec.epochs_per_stage[stage - 1]
    n = len(rows)
    metrics: dict = {"shard": shard, "stage": stage, "rows": n, "epochs": [], "seconds": 0.0}
    t0, c0 = time.perf_counter(), time.thread_time()
    if n > 0 and epochs > 0:
        X, y = _tensor(rows["x"], np.float32), _tensor(rows["y"], np.int64)
        cb = _train(spec, shard, stage, module, X, y, opt_states, sched_states)
        opt_states, sched_states = cb.opt_states, cb.sched_states
        metrics["epochs"] = cb.epochs
        # what ran (the fast engine where it applies, see shards.fast) and its fixed cost in this stage
        fast = isinstance(module, SisaModule) and bool(module._fast)
        metrics["engine"] = "fast" if fast else "eager"
        metrics["engine_setup_seconds"] = module.engine_setup_seconds if fast else 0.0
        if spec.accelerator != "cpu":  # on the CPU it already is: `Module.cpu` walks every parameter
            module = module.cpu()
        step = -(-n // ACCURACY_ROWS)
        metrics["train_accuracy"] = _accuracy(module, X[::step], y[::step])
    metrics["seconds"] = time.perf_counter() - t0
    metrics["cpu_seconds"] = time.thread_time() - c0
    ckpt = {
        "format": FORMAT,
        "shard": shard,
        "stage": stage,
        "rows": n,
        "lineage": lineage,
        "state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
        "optimizers": _cpu(opt_states or []),
        "schedulers": list(sched_states or []),
    }
    return ckpt, metrics


class Trained(NamedTuple):
    """What a stage's training leaves: per-epoch metrics and the optimizer and scheduler states."""

    epochs: list[dict]
    opt_states: list
    sched_states: list


def _train(spec: TrainSpec, shard: int, stage: int, module, X, y, opt_states, sched_states) -> Trained | _ExactResume:
    """One stage's training. Built-ins: chunks of batches, in `shards.loop` on the CPU, else a barebones
    Trainer. A user's module: plain batches, its ``sisa_context``, and a Trainer that keeps ``self.log``
    (no logger, checkpoints or progress bar)."""
    sampler = EpochBatches(len(y), spec.batch_size, spec.seed, shard, stage)
    builtin = isinstance(module, SisaModule)
    if builtin:
        row_bytes = max(1, X[0].numel() * X.element_size())
        loader = EpochChunks(X, y, sampler, min(CHUNK_ROWS, CHUNK_BYTES // row_bytes) // spec.batch_size)
        module.sisa_engine = spec.extra.get("engine", "eager")  # training.engine (shards.fast)
        module.sisa_precision = spec.extra.get("precision", FP32)  # training.precision
        if DIRECT and loop.applies(module, spec.accelerator):  # no Trainer: the same bits (shards.loop)
            return Trained(*loop.train(spec, shard, stage, module, loader, sampler, opt_states, sched_states))
    else:
        loader = DataLoader(
            _Rows(X, y),
            sampler=sampler,
            batch_size=None,
            generator=torch.Generator().manual_seed(derive_seed(spec.seed, shard, stage, "loader")),
        )
        module.sisa_context = SisaContext(shard, stage, spec.epochs_per_stage, len(y), spec.batch_size, spec.optim)
    with quiet_training():  # only Lightning chatters: the direct loop needs no silencing
        return _fit(spec, stage, module, loader, _ExactResume(spec, shard, stage, opt_states, sched_states, sampler))


def _fit(spec: TrainSpec, stage: int, module, loader, cb: _ExactResume) -> _ExactResume:
    """The Lightning fit of one stage."""
    builtin = isinstance(module, SisaModule)
    mode: dict = {"barebones": True}
    if not builtin:
        mode = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
        mode |= {"enable_model_summary": False, "num_sanity_val_steps": 0}
    trainer = pl.Trainer(
        accelerator=spec.accelerator,
        devices=1,
        max_epochs=spec.epochs_per_stage[stage - 1],
        callbacks=[cb],
        deterministic=spec.accelerator != "cpu",
        precision=spec.extra.get("precision", FP32),
        **mode,
    )
    try:
        trainer.fit(module, train_dataloaders=loader)
    except ValueError as e:
        if builtin or "Tried to step" not in str(e):
            raise
        raise ConfigError(
            f"model {spec.model!r}: its LR scheduler ran past its horizon in stage {stage} ({e}). Every stage "
            "resumes the scheduler of the stage before, so the horizon must cover all stages: e.g. "
            "OneCycleLR(total_steps=self.sisa_context.total_epochs) with interval 'epoch'. "
            "trainer.estimated_stepping_batches counts the current stage only",
            problems=[f"model.name: scheduler horizon too short at stage {stage}"],
        ) from None
    return cb


@torch.no_grad()
def _tensor(a: np.ndarray, dtype) -> torch.Tensor:
    """A worker's cached rows (`shards.rowcache`) as a tensor over them, without a copy: over the mapping,
    so a shard larger than memory trains (every batch is gathered into a fresh tensor, and nothing writes to
    these). Other arrays are copied, not ascontiguousarray'd: a one-row field view counts as contiguous
    with the record's stride. Either way the batches hold the same values, so the same bits."""
    own = isinstance(a, np.memmap) or a.flags.owndata
    if own and a.dtype == dtype and a.flags.c_contiguous:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(a)
    return torch.from_numpy(np.array(a, dtype=dtype, order="C", copy=True))


def _accuracy(module, X, y) -> float:
    was = module.training
    # a built-in without dropout computes the same in either mode: two walks of the module tree spared
    toggle = not (isinstance(module, SisaModule) and not module.mode_dependent)
    if toggle:
        module.eval()
    correct = 0
    for i in range(0, len(y), 4096):
        correct += int((module(X[i : i + 4096]).argmax(1) == y[i : i + 4096]).sum())
    if toggle:
        module.train(was)
    return correct / max(1, len(y))


def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj
