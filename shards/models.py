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
import time

import pytorch_lightning as pl
import torch
from torch import nn

from shards.errors import ConfigError
from shards.spec import BF16_MIXED, FP32


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
        self._fast = None  # shards.fast.FastMLP once bound (False: not applicable), see _fast_engine
        self.sisa_precision = FP32  # training.precision, set per stage by shards.training
        self.engine_setup_seconds = 0.0

    def forward(self, x):
        return self.net(x)

    @property
    def mode_dependent(self) -> bool:
        """Whether train and eval mode compute different outputs: the built-in nets differ by dropout only."""
        return any(isinstance(m, nn.Dropout) for m in self.net.modules())

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
        return self.train_chunk(lopt.optimizer if plain else lopt, xs, ys, plain)

    def train_chunk(self, opt, xs, ys, plain: bool = True) -> dict:
        """`_chunk_step` with the optimizer given: ``plain`` steps the torch optimizer ``opt`` directly (also
        what `shards.loop` calls, without a Trainer), else ``opt`` is Lightning's and so is the backward."""
        fast = self._fast_engine(opt) if plain else None
        fast_logits: list = []  # the fast engine counts correct predictions once per chunk
        total = torch.zeros((), device=xs[0].device)
        correct = torch.zeros((), dtype=torch.long, device=xs[0].device)
        bf16 = self.sisa_precision == BF16_MIXED
        for xb, yb in zip(xs, ys):
            if fast is not None:  # the same kernels without autograd (shards.fast): the same bits
                loss, logits = fast.step(xb, yb)
                fast_logits.append(logits)
                total += loss
                continue
            opt.zero_grad(set_to_none=True)
            if bf16:  # per batch, uncached (as Lightning's plugin): a cast cached across batches would be stale
                with torch.autocast(xb.device.type, dtype=torch.bfloat16, cache_enabled=False):
                    logits = self.net(xb)
                    loss = nn.functional.cross_entropy(logits, yb)
            else:
                logits = self.net(xb)
                loss = nn.functional.cross_entropy(logits, yb)
            correct += (logits.detach().argmax(1) == yb).sum()
            if plain:
                loss.backward()
            else:
                self.manual_backward(loss)
            opt.step()
            total += loss.detach()
        if fast is not None:
            fast.sync()
            correct += (torch.cat(fast_logits).argmax(1) == torch.cat(ys)).sum()
            opt._opt_called = True  # what torch's Optimizer.step marks for LR schedulers (no false warning)
        return {
            "loss": total / len(xs),
            "loss_sum": total,
            "batches": len(xs),
            "correct": correct,
            "seen": sum(len(yb) for yb in ys),
        }

    def _fast_engine(self, opt):
        """`shards.fast.FastMLP` bound to ``opt`` when ``sisa_engine`` is "fast" and it applies (built once per
        stage; ``engine_setup_seconds`` is its fixed cost), else None: the eager step."""
        if getattr(self, "sisa_engine", "eager") != "fast":
            return None
        if self._fast is None:
            from shards import fast

            t0 = time.perf_counter()
            self._fast = fast.build(self.net, opt, bf16=self.sisa_precision == BF16_MIXED) or False
            self.engine_setup_seconds = time.perf_counter() - t0
        return self._fast or None

    def on_train_epoch_end(self):
        sch = self.lr_schedulers()
        if sch is not None:
            sch.step()

    def configure_optimizers(self):
        if self.opt_name == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        else:
            # bf16-mixed: torch's fused Adam kernel (other bits than the for-loop Adam; shards.fast calls it too)
            fused = True if self.sisa_precision == BF16_MIXED else None
            opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay, fused=fused)
        if self.lr_gamma == 1.0:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.ExponentialLR(opt, self.lr_gamma)}


def import_target(target: str, what: str, field: str, hint: str):
    """Resolve "package.module:Name" (or "package.module.Name"), or a ConfigError about config ``field``."""
    mod_name, _, attr = target.partition(":") if ":" in target else target.rpartition(".")
    try:
        return getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(
            f"{what} {target!r} cannot be imported ({e}); {hint}", problems=[f"{field}: {target!r} cannot be imported"]
        ) from e


def load_class(target: str):
    """Resolve "package.module:Class" (or "package.module.Class")."""
    obj = import_target(
        target,
        "model",
        "model.name",
        "use 'mlp', 'cnn' or an import path like 'mypkg.models:MyModule' that is importable here and on every "
        "Ray worker (install the package on every node, or put its directory on PYTHONPATH)",
    )
    if isinstance(obj, type) and not issubclass(obj, pl.LightningModule) or not callable(obj):
        raise ConfigError(
            f"model {target!r} is {obj!r}, not a pytorch_lightning.LightningModule subclass",
            problems=[f"model.name: {target!r} is not a LightningModule"],
        )
    return obj


_BOUND: set[str] = set()  # built-in constructor calls already checked (every stage builds its module)


def _bind(name: str, fn, args: tuple, given: dict, kwargs: dict) -> None:
    """Check the constructor call before making it: a clear ConfigError, never a bare TypeError."""
    key = repr((name, args, sorted(given.items()), sorted(kwargs.items()))) if name in NETS else None
    if key in _BOUND:
        return
    dup = sorted(given.keys() & kwargs.keys())
    if dup:
        raise ConfigError(
            f"model.kwargs sets {', '.join(dup)}, which sisa passes to {name!r} itself (input_shape from the "
            "data, num_classes from data.num_classes); remove it from model.kwargs",
            problems=[f"model.kwargs.{k}: set by sisa" for k in dup],
        )
    try:
        inspect.signature(fn).bind(*args, **given, **kwargs)
    except TypeError as e:
        raise ConfigError(
            f"model {name!r} cannot be built with model.kwargs {sorted(kwargs)} ({e}); "
            f"its constructor is {fn.__name__}{inspect.signature(fn)}",
            problems=[f"model.kwargs: {e}"],
        ) from None
    if key is not None:
        _BOUND.add(key)


def build_module(name: str, kwargs: dict, optim: dict, input_shape, num_classes: int) -> pl.LightningModule:
    """Build a sub-model. The caller seeds torch first, so the initial weights are a function of the seed."""
    if name in NETS:
        _bind(name, NETS[name], (input_shape, num_classes), {}, kwargs)
        return SisaModule(NETS[name](input_shape, num_classes, **kwargs), **optim)
    cls = load_class(name)
    params = inspect.signature(cls).parameters
    extra = {k: v for k, v in (("input_shape", tuple(input_shape)), ("num_classes", num_classes)) if k in params}
    _bind(name, cls, (), extra, kwargs)
    module = cls(**extra, **kwargs)
    if not isinstance(module, pl.LightningModule):  # a factory function named by the import path
        raise ConfigError(
            f"model {name!r} returned a {type(module).__name__}, not a pytorch_lightning.LightningModule",
            problems=[f"model.name: {name!r} is not a LightningModule"],
        )
    return module


def check_module(name: str, kwargs: dict, optim: dict, input_shape, num_classes: int) -> None:
    """What can be checked before training (on the driver, at fit): the module builds, is a LightningModule
    with a training_step and configure_optimizers, and ``forward`` maps a batch of zeros of shape
    (2, *input_shape) to logits of shape (2, num_classes). Raises ConfigError saying what is wrong.
    Seeds torch: call it inside ``torch.random.fork_rng``."""
    torch.manual_seed(0)
    module = build_module(name, kwargs, optim, input_shape, num_classes)
    if not isinstance(module, SisaModule):
        for hook in ("training_step", "configure_optimizers"):
            if getattr(type(module), hook) is getattr(pl.LightningModule, hook):
                raise ConfigError(
                    f"model {name!r} does not define {hook}(); a sub-model needs training_step (returning the "
                    "loss) and configure_optimizers (sisa's training.optimizer/lr apply to the built-ins only)",
                    problems=[f"model.name: {name!r} has no {hook}"],
                )
    shape = (2, *tuple(input_shape))
    want = (2, num_classes)
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(shape))
    except Exception as e:
        raise ConfigError(
            f"model {name!r}: forward on a batch of zeros of shape {shape} (the data's rows) failed: "
            f"{type(e).__name__}: {e}",
            problems=[f"model.name: forward fails on input of shape {shape}"],
        ) from e
    finally:
        module.train(was)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != want:
        raise ConfigError(
            f"model {name!r}: forward on a batch of shape {shape} returned {got}; it must return logits of shape "
            f"(batch, num_classes) = {want} (num_classes is data.num_classes, or the largest label + 1)",
            problems=[f"model.name: forward returns {got}, not {want}"],
        )
