"""The hand-written torch loop the framework's training is compared with.

Same model (`shards.models.MLP` with the ensemble's kwargs), same optimizer and learning rate, same batch
size and the same sample-epochs: for each shard, stage i trains on slices 1..i for e_i epochs, with one
random permutation per epoch and tensor indexing per batch. One thread, in this process: no Lightning,
no Ray, no checkpoints, no data files (the slices are read before the clock starts).
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from torch import nn

from shards.models import MLP
from shards.store import read_slice


def train_shard(
    stages: list[tuple[torch.Tensor, torch.Tensor, int]], make_model, lr: float, batch_size: int, bf16: bool = False
) -> int:
    """Train one model through ``stages`` [(X, y, epochs), ...]; returns the sample-epochs done. ``bf16``:
    the forward pass and loss under ``torch.autocast(cpu, bfloat16)``, the usual mixed-precision loop."""
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    done = 0
    for X, y, epochs in stages:
        for _ in range(epochs):
            for idx in torch.randperm(len(y)).split(batch_size):
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
                loss.backward()
                opt.step()
            done += len(y)
    return done


def run(ens, shards: list[int]) -> dict:
    """Time the plain loop on ``shards`` of a fitted ensemble's partition (slices read from its storage)."""
    c, m = ens.config, ens.manifest
    epochs = ens.config.epochs_per_stage()
    storage = ens.storage()
    work = []
    for s in shards:
        parts = [read_slice(storage, e.to_dict()) for e in m.shards[s].slices]
        stages = []
        for i, e in enumerate(epochs):
            rows = np.concatenate(parts[: i + 1])
            X = torch.from_numpy(np.ascontiguousarray(rows["x"]))
            y = torch.from_numpy(np.ascontiguousarray(rows["y"]))
            stages.append((X, y, e))
        work.append(stages)
    kwargs = dict(c.model.kwargs)

    def make_model():
        return MLP(tuple(m["input_shape"]), m["num_classes"], **kwargs)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        w0, c0 = time.perf_counter(), time.process_time()
        sample_epochs = sum(train_shard(st, make_model, c.training.lr, c.training.batch_size) for st in work)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    finally:
        torch.set_num_threads(threads)
    return {"shards": list(shards), "wall_seconds": wall, "cpu_seconds": cpu, "sample_epochs": sample_epochs}
