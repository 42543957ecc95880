"""The direct stage loop: a built-in module's (`shards.models.SisaModule`) stage on the CPU without a
Lightning Trainer, with the same bits as `shards.training`'s Lightning fit of it.

A Trainer costs about 10 ms to build and start (its constructor scans the installed packages' entry
points for callbacks) and its fit loop adds hooks per epoch; at hundreds of shards x slices that fixed
cost per stage dominates a fit (issue 14). The built-ins need none of it: they use manual optimization,
one torch optimizer, an optional per-epoch LR scheduler, and take whole chunks of batches
(`SisaModule.train_chunk`). This loop does what the Lightning fit of them does, in the same order:
``configure_optimizers``, load the optimizer then the scheduler state, and per epoch reseed torch and
the sampler from (seed, shard, stage, epoch), train the chunks, record the epoch's metrics, step the
scheduler. tests/unit/shards/test_direct_loop.py checks it against the Lightning fit byte for byte.

Users' LightningModules, and every module on an accelerator, still train under a Trainer.
"""

from __future__ import annotations

import time

import torch

from shards.spec import derive_seed


def applies(module, accelerator: str) -> bool:
    """Whether a stage of ``module`` runs here rather than under a Trainer: built-ins on the CPU."""
    from shards.models import SisaModule

    return type(module) is SisaModule and accelerator == "cpu"


def seed_torch(seed: int, accelerator: str) -> None:
    """Seed torch's generator for ``accelerator``. On the CPU only the CPU generator: `torch.manual_seed`
    also queues a seed for every lazily initialised device backend, recording a Python stack trace each
    time (about 1 ms, paid per epoch), and no device generator is used by a CPU stage."""
    if accelerator == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def _optimizers(module):
    """(optimizer, scheduler or None) from a built-in's ``configure_optimizers``."""
    out = module.configure_optimizers()
    if isinstance(out, dict):
        return out["optimizer"], out.get("lr_scheduler")
    return out, None


def train(spec, shard: int, stage: int, module, chunks, sampler, opt_states, sched_states):
    """Train ``module`` for this stage's epochs on ``chunks`` (`shards.training.EpochChunks` over
    ``sampler``). Returns (per-epoch metrics, optimizer states, scheduler states) as the Lightning fit's
    `shards.training._ExactResume` records them."""
    opt, sched = _optimizers(module)
    if opt_states:
        opt.load_state_dict(opt_states[0])
    if sched is not None and sched_states:
        sched.load_state_dict(sched_states[0])
    if not module.training:  # a freshly built module already is in training mode: spare the tree walk
        module.train()
    epochs = []
    with torch.enable_grad():
        for epoch in range(spec.epochs_per_stage[stage - 1]):
            seed_torch(derive_seed(spec.seed, shard, stage, epoch, "torch"), spec.accelerator)
            sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            loss, batches, correct, seen = 0.0, 0, 0, 0
            for xs, ys in chunks:
                out = module.train_chunk(opt, xs, ys)
                loss += float(out["loss_sum"])
                batches += out["batches"]
                correct += int(out["correct"])
                seen += out["seen"]
            record = {"epoch": epoch, "loss": loss / max(1, batches), "seconds": time.perf_counter() - t0}
            record["samples"] = sampler.n
            if seen:
                record["accuracy"] = correct / seen
            epochs.append(record)
            if sched is not None:
                sched.step()
    return epochs, [opt.state_dict()], ([sched.state_dict()] if sched is not None else [])
