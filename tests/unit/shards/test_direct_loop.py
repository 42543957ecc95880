"""The direct stage loop (shards.loop: built-ins on the CPU without a Trainer) gives the Lightning fit's
bits: every stage's checkpoint byte for byte and the same per-epoch metrics, on both engines, resumed."""

import numpy as np
import pytest
import torch

from shards import loop, training
from shards.spec import TrainSpec

ADAM = {"optimizer": "adam", "lr": 0.01, "weight_decay": 1e-3, "momentum": 0.0, "lr_gamma": 0.9}
SGD_MOMENTUM = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 0.0, "momentum": 0.9, "lr_gamma": 1.0}
CASES = {
    # rows per stage 79, 158, 237 at batch 16: every epoch ends with a smaller batch
    "mlp-adam-dropout-decay": ("mlp", {"hidden": [16, 8], "dropout": 0.2}, ADAM, (6,)),
    "mlp-sgd-momentum": ("mlp", {"hidden": [16]}, SGD_MOMENTUM, (6,)),
    "cnn-adam-dropout-decay": ("cnn", {"channels": [4], "dropout": 0.2}, ADAM, (6, 6)),
}


def _stages(direct, monkeypatch, engine, model, kwargs, optim, shape, precision="32-true"):
    monkeypatch.setattr(training, "DIRECT", direct)
    spec = TrainSpec(
        seed=5,
        model=model,
        model_kwargs=kwargs,
        optim=optim,
        epochs_per_stage=(2, 0, 3),
        batch_size=16,
        input_shape=shape,
        num_classes=3,
        extra={"engine": engine, "precision": precision},
    )
    rng = np.random.default_rng(1)
    data = np.zeros(237, dtype=[("x", np.float32, shape), ("y", np.int64)])
    data["x"] = rng.standard_normal((237, *shape))
    data["y"] = rng.integers(0, 3, 237)
    prev, out = None, []
    for stage in (1, 2, 3):
        ckpt, metrics = training.run_stage(spec, 0, stage, prev, data[: 79 * stage], "lineage")
        out.append((training.save_checkpoint(ckpt), metrics))
        prev = training.load_checkpoint(out[-1][0])  # resumed from the bytes, as a retrain is
    return out


@pytest.mark.parametrize("engine", ["fast", "eager"])
@pytest.mark.parametrize("name", list(CASES))
def test_direct_loop_checkpoints_equal_the_lightning_fit_byte_for_byte(monkeypatch, name, engine):
    calls = []
    real = loop.train
    monkeypatch.setattr(loop, "train", lambda *a: calls.append(1) or real(*a))
    lightning = _stages(False, monkeypatch, engine, *CASES[name])
    assert not calls, "DIRECT=False must train under Lightning"
    direct = _stages(True, monkeypatch, engine, *CASES[name])
    assert len(calls) == 2, "the direct loop must have run every stage that trains (stage 2 has 0 epochs)"
    for stage, ((a, ma), (b, mb)) in enumerate(zip(lightning, direct), start=1):
        ca, cb = training.load_checkpoint(a), training.load_checkpoint(b)
        for k in ca["state_dict"]:
            assert torch.equal(ca["state_dict"][k], cb["state_dict"][k]), f"stage {stage}: {k} differs"
        assert a == b, f"stage {stage}: checkpoint bytes differ"
        keep = ("epoch", "loss", "samples", "accuracy")
        assert [{k: e.get(k) for k in keep} for e in ma["epochs"]] == [
            {k: e.get(k) for k in keep} for e in mb["epochs"]
        ]
        assert ma.get("engine") == mb.get("engine") and ma.get("train_accuracy") == mb.get("train_accuracy")
    assert direct[2][1]["epochs"], "stage 3 trained"


@pytest.mark.parametrize("engine", ["fast", "eager"])
@pytest.mark.parametrize("name", ["mlp-adam-dropout-decay", "cnn-adam-dropout-decay"])
def test_bf16_mixed_direct_loop_equals_lightnings_bf16_mixed_plugin_byte_for_byte(monkeypatch, name, engine):
    """Under bf16-mixed a Trainer autocasts with its precision plugin (and steps the optimizer through
    Lightning); the direct loop's autocast, or the fast engine's bf16 step, gives the same bytes."""
    lightning = _stages(False, monkeypatch, engine, *CASES[name], "bf16-mixed")
    direct = _stages(True, monkeypatch, engine, *CASES[name], "bf16-mixed")
    assert [a for a, _ in lightning] == [b for b, _ in direct]
    assert direct[2][1]["engine"] == ("fast" if engine == "fast" and name.startswith("mlp") else "eager")
    fp32 = _stages(True, monkeypatch, engine, *CASES[name])
    assert fp32[2][0] != direct[2][0], "bf16-mixed computes in bf16"


def test_user_modules_subclasses_and_accelerators_keep_the_trainer():
    from usermodel import TinyNet

    from shards.models import MLP, SisaModule

    builtin = SisaModule(MLP((4,), 3))
    assert loop.applies(builtin, "cpu")
    assert not loop.applies(builtin, "gpu")
    assert not loop.applies(TinyNet((4,), 3), "cpu")
    assert not loop.applies(type("Mine", (SisaModule,), {})(MLP((4,), 3)), "cpu")
