"""Built-in sub-models (an MLP for tabular rows, a small CNN for small images) and the loader of a
user's own LightningModule named by import path.

The built-ins train with manual optimization: one optimizer step per whole batch, no per-step
bookkeeping, and they take several batches per Lightning step (`shards.training.EpochChunks`), which
keeps the framework's overhead close to a plain torch loop.
"""

from __future__ import annotations

import importlib
import inspect
import math

import pytorch_lightning as pl
import torch
from torch import nn

from shards.errors import ConfigError


class MLP(nn.Module):
    def __init__(self, input_shape, num_classes: int, hidden=(128, 64), dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head; takes (C, H, W) inputs, or (H, W) with one channel."""

    def __init__(self, input_shape, num_classes: int, channels=(16, 32), dropout: float = 0.0):
        super().__init__()
        shape = tuple(input_shape)
        self.unsqueeze = len(shape) == 2
        c = 1 if self.unsqueeze else shape[0]
        blocks: list[nn.Module] = []
        for out in channels:
            blocks += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
            c = out
        self.features = nn.Sequential(*blocks)
        head: list[nn.Module] = [nn.AdaptiveAvgPool2d(2), nn.Flatten()]
        if dropout:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(c * 4, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x):
        if self.unsqueeze:
            x = x.unsqueeze(1)
        return self.head(self.features(x))


NETS = {"mlp": MLP, "cnn": SmallCNN}


class SisaModule(pl.LightningModule):
    """Wraps a built-in net: cross-entropy, Adam or SGD, optional exponential LR decay per epoch."""

    def __init__(self, net: nn.Module, optimizer="adam", lr=1e-3, weight_decay=0.0, momentum=0.0, lr_gamma=1.0):
        super().__init__()
        self.net = net
        self.opt_name, self.lr, self.weight_decay = optimizer, lr, weight_decay
        self.momentum, self.lr_gamma = momentum, lr_gamma
        self.automatic_optimization = False

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if isinstance(x, (list, tuple)):  # several whole batches at once (shards.training.EpochChunks)
            return self._chunk_step(x, y)
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.manual_backward(loss)
        opt.step()
        return loss.detach()

    def _chunk_step(self, xs, ys):
        """One optimizer step per batch, in order: the same updates as one Lightning step per batch.

        On a single device in 32-bit precision the wrapped torch optimizer is stepped directly (no
        Lightning hooks per batch); otherwise Lightning's manual_backward / optimizer step are used.
        """
        lopt = self.optimizers()
        plain = self.trainer.precision == "32-true" and type(self.trainer.strategy).__name__ == "SingleDeviceStrategy"
        opt = lopt.optimizer if plain else lopt
        total = torch.zeros((), device=xs[0].device)
        correct = torch.zeros((), dtype=torch.long, device=xs[0].device)
        for xb, yb in zip(xs, ys):
            opt.zero_grad(set_to_none=True)
            logits = self.net(xb)
            loss = nn.functional.cross_entropy(logits, yb)
            correct += (logits.detach().argmax(1) == yb).sum()
            if plain:
                loss.backward()
            else:
                self.manual_backward(loss)
            opt.step()
            total += loss.detach()
        return {
            "loss": total / len(xs),
            "loss_sum": total,
            "batches": len(xs),
            "correct": correct,
            "seen": sum(len(yb) for yb in ys),
        }

    def on_train_epoch_end(self):
        sch = self.lr_schedulers()
        if sch is not None:
            sch.step()

    def configure_optimizers(self):
        if self.opt_name == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_gamma == 1.0:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.ExponentialLR(opt, self.lr_gamma)}


def load_class(target: str):
    """Resolve "package.module:Class" (or "package.module.Class")."""
    mod_name, _, attr = target.partition(":") if ":" in target else target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(
            f"model {target!r} cannot be imported ({e}); use 'mlp', 'cnn' or an import path like 'mypkg.models:MyModule'",
            problems=[f"model.name: {target!r} cannot be imported"],
        ) from e
    return obj


def build_module(name: str, kwargs: dict, optim: dict, input_shape, num_classes: int) -> pl.LightningModule:
    """Build a sub-model. The caller seeds torch first, so the initial weights are a function of the seed."""
    if name in NETS:
        return SisaModule(NETS[name](input_shape, num_classes, **kwargs), **optim)
    cls = load_class(name)
    params = inspect.signature(cls).parameters
    extra = {k: v for k, v in (("input_shape", tuple(input_shape)), ("num_classes", num_classes)) if k in params}
    module = cls(**extra, **kwargs)
    if not isinstance(module, pl.LightningModule):
        raise ConfigError(
            f"model {name!r} is a {type(module).__name__}, not a pytorch_lightning.LightningModule",
            problems=[f"model.name: {name!r} is not a LightningModule"],
        )
    return module
