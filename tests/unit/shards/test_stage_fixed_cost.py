"""The per-stage shortcuts of issue 14 (item 4) give what the long way gives: the train-accuracy pass without
mode switches, the constructor check done once per model, the sampler's reused generator."""

import numpy as np
import pytest
import torch

from shards import training
from shards.errors import ConfigError
from shards.models import build_module

ADAM = {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.0, "momentum": 0.0, "lr_gamma": 1.0}


def _eval_accuracy(module, X, y) -> float:
    module.eval()
    with torch.no_grad():
        acc = float((module(X).argmax(1) == y).float().mean())
    module.train()
    return acc


@pytest.mark.parametrize(
    "model,kwargs,shape,dropout",
    [
        ("mlp", {"hidden": [32]}, (6,), False),
        ("mlp", {"hidden": [32], "dropout": 0.9}, (6,), True),
        ("cnn", {"channels": [4], "dropout": 0.9}, (8, 8), True),
    ],
)
def test_train_accuracy_is_the_eval_mode_figure_with_or_without_mode_switches(model, kwargs, shape, dropout):
    torch.manual_seed(0)
    module = build_module(model, kwargs, ADAM, shape, 3)
    X = torch.randn(512, *shape)
    module.eval()
    with torch.no_grad():
        y = module(X).argmax(1)  # the eval-mode predictions: accuracy 1.0 in eval mode, less in training mode
    module.train()
    switches = []
    real_train = module.train
    module.train = lambda mode=True: switches.append(mode) or real_train(mode)
    assert module.mode_dependent is dropout
    want = _eval_accuracy(module, X, y)
    switches.clear()
    assert want == 1.0 and training._accuracy(module, X, y) == want
    assert module.training and all(m.training for m in module.modules()), "the module's mode is restored"
    assert switches == ([False, True] if dropout else []), "only a module with dropout switches modes"
    if dropout:  # in training mode the figure would differ: the switch is needed, and this test can tell
        with torch.no_grad():
            assert float((module(X).argmax(1) == y).float().mean()) != want


def test_a_checked_constructor_call_does_not_let_a_bad_one_through():
    build_module("mlp", {"hidden": [8]}, ADAM, (4,), 3)
    build_module("mlp", {"hidden": [8]}, ADAM, (4,), 3)  # the second time from the memo
    with pytest.raises(ConfigError, match=r"cannot be built with model.kwargs \['hiden'\]"):
        build_module("mlp", {"hiden": [8]}, ADAM, (4,), 3)
    with pytest.raises(ConfigError, match="multiple values for argument 'input_shape'"):
        build_module("mlp", {"hidden": [8], "input_shape": (4,)}, ADAM, (4,), 3)


def test_the_sampler_reseeds_its_one_generator_to_the_order_of_a_fresh_one():
    sampler = training.EpochBatches(203, 16, seed=3, shard=1, stage=2)
    for epoch in (1, 0, 1, 4):  # any history: each epoch's order depends on (seed, shard, stage, epoch) only
        sampler.set_epoch(epoch)
        fresh = training.EpochBatches(203, 16, seed=3, shard=1, stage=2)
        fresh.set_epoch(epoch)
        got, want = list(sampler), list(fresh)
        assert [b.tolist() for b in got] == [b.tolist() for b in want]
        assert sorted(np.concatenate([b.numpy() for b in got]).tolist()) == list(range(203))
    sampler.set_epoch(0)
    other = list(sampler)
    sampler.set_epoch(1)
    assert [b.tolist() for b in other] != [b.tolist() for b in sampler], "epochs are ordered differently"
