"""Combining sub-models: mean of probabilities (default) or majority vote, with optional shard weights.

When every sub-model has the same architecture, they run as one batched call (stacked parameters and
torch.func.vmap) instead of a Python loop over shards.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call, stack_module_state


class Aggregator:
    def __init__(self, modules: dict[int, torch.nn.Module], num_classes: int, method="mean_proba", weights=None):
        self.shards = sorted(modules)
        self.modules = [modules[s].eval() for s in self.shards]
        self.num_classes, self.method = num_classes, method
        w = np.ones(len(self.shards)) if weights is None else np.array([weights[s] for s in self.shards], float)
        self.weights = torch.tensor(w / w.sum() if w.sum() > 0 else np.ones_like(w) / len(w), dtype=torch.float32)
        self._fused = self._try_fuse()

    def _try_fuse(self):
        if len(self.modules) < 2:
            return None
        sigs = {tuple((k, tuple(v.shape)) for k, v in m.state_dict().items()) for m in self.modules}
        if len(sigs) != 1 or len({type(m) for m in self.modules}) != 1:
            return None
        params, buffers = stack_module_state(self.modules)
        base = self.modules[0]

        def call(p, b, x):
            return functional_call(base, (p, b), (x,))

        return torch.vmap(call, in_dims=(0, 0, None)), params, buffers

    @torch.no_grad()
    def logits(self, X: torch.Tensor) -> torch.Tensor:
        """(shards, n, classes) logits."""
        if self._fused is not None:
            fn, p, b = self._fused
            try:
                return fn(p, b, X)
            except Exception:  # an op vmap cannot batch: fall back to the loop for good
                self._fused = None
        return torch.stack([m(X) for m in self.modules])

    @torch.no_grad()
    def predict_proba(self, X: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        out = []
        for i in range(0, len(X), batch_size):
            logits = self.logits(torch.from_numpy(X[i : i + batch_size]))
            if self.method == "majority_vote":
                votes = torch.nn.functional.one_hot(logits.argmax(-1), self.num_classes).float()
                out.append(torch.einsum("s,snc->nc", self.weights, votes))
            else:
                out.append(torch.einsum("s,snc->nc", self.weights, logits.softmax(-1)))
        return torch.cat(out).numpy() if out else np.zeros((0, self.num_classes), np.float32)

    def per_shard_predictions(self, X: np.ndarray) -> np.ndarray:
        return self.logits(torch.from_numpy(X)).argmax(-1).numpy()


def decide(proba: np.ndarray) -> np.ndarray:
    """Argmax with ties broken towards the lowest class index."""
    return proba.argmax(1)
