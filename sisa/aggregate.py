"""Combining sub-models: mean of probabilities (default) or majority vote, with optional shard weights.

S sub-models of one architecture are evaluated one of two ways, with the same result up to float rounding:
- **fused**: one batched call for all of them. The built-in MLP runs as a chain of batched matmuls over
  stacked weights (`torch.baddbmm`); any other shared architecture through
  `torch.func.stack_module_state` + `vmap`. This saves S-1 rounds of Python and dispatch overhead, which
  is most of the cost of a small request (a few rows: several times faster than the loop at S >= 8).
- **the loop** over sub-models, block by block of rows. On a CPU one plain GEMM per sub-model outruns a
  batched GEMM once a block has a few hundred rows, and a fused call holds every sub-model's activations
  at once (memory-bound). So requests above ``FUSED_MAX_ROWS`` rows take the loop, whose cost is the sum
  of the sub-models' forward passes plus a softmax per shard.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state

FUSED_MAX_ROWS = 256  # measured crossover on CPU: below it the fused call wins, above it the loop
BLOCK_ROWS = 2048  # rows per forward pass in the loop (intermediates stay cache-sized)


def shard_weights(shards: list[int], weights=None) -> torch.Tensor:
    """The aggregation weights of ``shards`` (configured ``weights`` or equal), normalised to sum 1."""
    w = np.ones(len(shards)) if weights is None else np.array([weights[s] for s in shards], float)
    return torch.tensor(w / w.sum() if w.sum() > 0 else np.ones_like(w) / len(w), dtype=torch.float32)


class Aggregator:
    def __init__(
        self, modules: dict[int, torch.nn.Module], num_classes: int, method="mean_proba", weights=None, encoder=None
    ):
        self.encoder = encoder  # model.encoder: every row goes through it once, then to the sub-models (heads)
        self.shards = sorted(modules)
        self.modules = [modules[s].eval() for s in self.shards]
        self.num_classes, self.method = num_classes, method
        self.weights = shard_weights(self.shards, weights)
        self._fused = self._try_fuse()

    def _try_fuse(self):
        """A callable X -> (shards, n, classes) logits for all sub-models at once, or None."""
        if len(self.modules) < 2:
            return None
        sigs = {tuple((k, tuple(v.shape)) for k, v in m.state_dict().items()) for m in self.modules}
        if len(sigs) != 1 or len({type(m) for m in self.modules}) != 1:
            return None
        chain = _linear_chain(self.modules)
        if chain is not None:
            return chain
        params, buffers = stack_module_state(self.modules)
        base = self.modules[0]

        def call(p, b, x):
            return functional_call(base, (p, b), (x,))

        fn = torch.vmap(call, in_dims=(0, 0, None))
        return lambda X: fn(params, buffers, X)

    def _fused_logits(self, X: torch.Tensor) -> torch.Tensor | None:
        if self._fused is None or len(X) > FUSED_MAX_ROWS:
            return None
        try:
            return self._fused(X)
        except Exception:  # an op vmap cannot batch: use the loop for good
            self._fused = None
            return None

    @torch.no_grad()
    def logits(self, X: torch.Tensor) -> torch.Tensor:
        """(shards, n, classes) logits."""
        if self.encoder is not None:
            X = self.encoder(X)
        fused = self._fused_logits(X)
        if fused is not None:
            return fused
        if len(X) == 0:
            return torch.stack([m(X) for m in self.modules])
        return torch.cat(
            [torch.stack([m(X[i : i + BLOCK_ROWS]) for m in self.modules]) for i in range(0, len(X), BLOCK_ROWS)], 1
        )

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        return scores(logits, self.method, self.num_classes)

    @torch.no_grad()
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.predict_all(X)[0]

    @torch.no_grad()
    def predict_all(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, classes) aggregated probabilities and (shards, n) each sub-model's predicted class, in one pass."""
        if len(X) == 0:
            return np.zeros((0, self.num_classes), np.float32), np.zeros((len(self.modules), 0), np.int64)
        X = torch.from_numpy(np.array(X, dtype=np.float32, order="C", copy=True))  # a one-row field view may be oddly strided
        if self.encoder is not None:
            X = self.encoder(X)
        fused = self._fused_logits(X)
        if fused is not None:
            proba = torch.einsum("s,scn->nc", self.weights, self._scores(fused))
            return proba.contiguous().numpy(), fused.argmax(-1).numpy()
        out = torch.empty(self.num_classes, len(X))
        votes = torch.empty(len(self.modules), len(X), dtype=torch.int64)
        weights = self.weights.tolist()
        for i in range(0, len(X), BLOCK_ROWS):  # sub-model by sub-model, each output consumed at once
            block, acc = X[i : i + BLOCK_ROWS], out[:, i : i + BLOCK_ROWS].zero_()
            for s, (w, m) in enumerate(zip(weights, self.modules)):
                logits = m(block)
                votes[s, i : i + BLOCK_ROWS] = logits.argmax(-1)
                acc.add_(self._scores(logits), alpha=w)
        return out.t().contiguous().numpy(), votes.numpy()

    def per_shard_predictions(self, X: np.ndarray) -> np.ndarray:
        return self.predict_all(X)[1]


def scores(logits: torch.Tensor, method: str, num_classes: int) -> torch.Tensor:
    """Per-row class scores of (..., n, classes) logits, laid out as (..., classes, n): a softmax over
    a few classes runs several times faster along a leading dim than along the last one."""
    if method == "majority_vote":
        return nn.functional.one_hot(logits.argmax(-1), num_classes).float().transpose(-1, -2)
    return logits.transpose(-1, -2).softmax(-2)


@torch.no_grad()
def shard_outputs(module: nn.Module, X: torch.Tensor, method: str, num_classes: int):
    """One sub-model's (classes, n) scores and (n,) predicted classes on ``X``, block by block of rows
    exactly as `Aggregator.predict_all`'s loop computes them (so cached outputs combine to the same bits)."""
    out = torch.empty(num_classes, len(X))
    votes = torch.empty(len(X), dtype=torch.int64)
    for i in range(0, len(X), BLOCK_ROWS):
        logits = module.eval()(X[i : i + BLOCK_ROWS])
        votes[i : i + BLOCK_ROWS] = logits.argmax(-1)
        out[:, i : i + BLOCK_ROWS] = scores(logits, method, num_classes)
    return out, votes


def combine(outputs: list[torch.Tensor], weights: torch.Tensor) -> np.ndarray:
    """(n, classes) aggregated probabilities of per-shard (classes, n) scores, added in shard order with
    the loop's arithmetic (`Aggregator.predict_all`)."""
    acc = torch.zeros_like(outputs[0])
    for w, sc in zip(weights.tolist(), outputs):
        acc.add_(sc, alpha=w)
    return acc.t().contiguous().numpy()


def _linear_chain(modules: list[nn.Module]):
    """The built-in MLP (`SisaModule` around `shards.models.MLP`) as batched matmuls over stacked weights,
    or None for any other net. Dropout is the identity here (sub-models are in eval mode)."""
    from shards.models import MLP, SisaModule

    nets = [m.net if type(m) is SisaModule else m for m in modules]
    if not all(type(n) is MLP for n in nets):
        return None
    ops: list = []
    for i, layer in enumerate(nets[0].layers):
        if isinstance(layer, nn.Linear) and layer.bias is not None:
            W = torch.stack([n.layers[i].weight.detach() for n in nets]).transpose(1, 2).contiguous()
            b = torch.stack([n.layers[i].bias.detach() for n in nets]).unsqueeze(1)
            ops.append((W, b))
        elif isinstance(layer, nn.ReLU):
            ops.append("relu")
        elif isinstance(layer, (nn.Dropout, nn.Flatten, nn.Identity)):
            continue  # Flatten: the input is flattened once below
        else:
            return None
    S = len(nets)

    def run(X: torch.Tensor) -> torch.Tensor:
        h = X.reshape(len(X), -1).expand(S, len(X), -1)
        for op in ops:
            h = torch.relu(h) if op == "relu" else torch.baddbmm(op[1], h, op[0])
        return h

    return run


def decide(proba: np.ndarray) -> np.ndarray:
    """Argmax with ties broken towards the lowest class index."""
    return proba.argmax(1)
