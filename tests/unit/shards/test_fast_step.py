"""The fast engine (shards.fast) gives the eager step's bits: every stage's checkpoint, byte for byte, in fp32
and under bf16-mixed (the eager step under torch.autocast)."""

import numpy as np
import pytest
import torch

from shards import training
from shards.spec import TrainSpec

ADAM = {"optimizer": "adam", "lr": 0.01, "weight_decay": 1e-3, "momentum": 0.0, "lr_gamma": 0.9}
SGD_MOMENTUM = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 1e-3, "momentum": 0.9, "lr_gamma": 0.9}
SGD = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 0.0, "momentum": 0.0, "lr_gamma": 1.0}

CASES = {
    # rows per stage 79, 158, 237 at batch 16: every epoch ends with a smaller batch (15, 14, 13 rows)
    "adam-dropout-wd-decay": ({"hidden": [16, 8], "dropout": 0.2}, ADAM, (6,), 16),
    "sgd-momentum-wd": ({"hidden": [16, 8]}, SGD_MOMENTUM, (6,), 16),
    "sgd-plain-one-hidden": ({"hidden": [32]}, SGD, (6,), 16),
    # (H, W) rows flattened by the MLP; batch 100 is larger than stage 1 (79 rows: one short batch)
    "adam-image-rows-one-short-batch": ({"hidden": [24]}, ADAM, (2, 3), 100),
}


def _rows(n, shape, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = np.zeros(n, dtype=[("x", np.float32, shape), ("y", np.int64)])
    rows["x"] = rng.standard_normal((n, *shape))
    rows["y"] = rng.integers(0, classes, n)
    return rows


def _stages(engine, kwargs, optim, shape, batch, precision="32-true"):
    spec = TrainSpec(
        seed=3,
        model="mlp",
        model_kwargs=kwargs,
        optim=optim,
        epochs_per_stage=(2, 2, 3),
        batch_size=batch,
        input_shape=shape,
        num_classes=3,
        extra={"engine": engine, "precision": precision},
    )
    data, prev, out = _rows(237, shape), None, []
    for stage in (1, 2, 3):
        ckpt, metrics = training.run_stage(spec, 0, stage, prev, data[: 79 * stage], "lineage")
        out.append((training.save_checkpoint(ckpt), metrics))  # serialized at once, as StageRunner does
        prev = ckpt
    return out


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("name", list(CASES))
def test_fast_engine_checkpoints_equal_the_eager_ones_byte_for_byte(name, precision):
    eager, fast = _stages("eager", *CASES[name], precision), _stages("fast", *CASES[name], precision)
    assert [m["engine"] for _, m in fast] == ["fast"] * 3, "the fast engine must have run"
    assert [m["engine"] for _, m in eager] == ["eager"] * 3
    for stage, ((a, ma), (b, mb)) in enumerate(zip(eager, fast), start=1):
        ca, cb = training.load_checkpoint(a), training.load_checkpoint(b)
        for k in ca["state_dict"]:
            assert torch.equal(ca["state_dict"][k], cb["state_dict"][k]), f"stage {stage}: {k} differs"
        sa, sb = ca["optimizers"][0]["state"], cb["optimizers"][0]["state"]
        assert sa.keys() == sb.keys()
        for p in sa:
            assert sa[p].keys() == sb[p].keys()
            assert all(torch.equal(sa[p][k], sb[p][k]) for k in sa[p]), f"stage {stage}: optimizer state differs"
        assert a == b, f"stage {stage}: checkpoint bytes differ"
        assert [e["loss"] for e in ma["epochs"]] == [e["loss"] for e in mb["epochs"]]
        assert mb["engine_setup_seconds"] >= 0.0


def test_unsupported_models_fall_back_to_the_eager_step():
    spec = TrainSpec(
        seed=1,
        model="cnn",
        model_kwargs={"channels": [4]},
        optim=ADAM,
        epochs_per_stage=(1,),
        batch_size=8,
        input_shape=(6, 6),
        num_classes=3,
        extra={"engine": "fast"},
    )
    _, metrics = training.run_stage(spec, 0, 1, None, _rows(30, (6, 6)), "lineage")
    assert metrics["engine"] == "eager"


def test_bf16_mixed_changes_the_bits_and_keeps_fp32_master_weights():
    """bf16-mixed really runs (it is not fp32 under another name) and the checkpoint stays fp32."""
    fp32, bf16 = (
        _stages("fast", *CASES["adam-dropout-wd-decay"]),
        _stages("fast", *CASES["adam-dropout-wd-decay"], "bf16-mixed"),
    )
    a, b = training.load_checkpoint(fp32[-1][0]), training.load_checkpoint(bf16[-1][0])
    assert all(v.dtype == torch.float32 for v in b["state_dict"].values())
    assert not all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    close = [torch.allclose(a["state_dict"][k], b["state_dict"][k], atol=0.05) for k in a["state_dict"]]
    assert all(close), "bf16 arithmetic drifts a little from fp32, not far"


def test_bf16_mixed_steps_torchs_fused_adam_and_fp32_the_for_loop_adam():
    """The checkpoints record which Adam ran; fp32 keeps the for-loop Adam (its bits are older workdirs')."""
    fp32, bf16 = (_stages("fast", *CASES["adam-dropout-wd-decay"], p) for p in ("32-true", "bf16-mixed"))
    groups = [training.load_checkpoint(ckpt)["optimizers"][0]["param_groups"][0] for ckpt, _ in fp32 + bf16]
    assert [bool(g["fused"]) for g in groups] == [False] * 3 + [True] * 3


def _fast_adam_step(fused: bool, weight_decay: float) -> list[torch.Tensor]:
    from shards import fast
    from shards.models import MLP

    torch.manual_seed(0)
    net = MLP((40,), 4, hidden=(256, 256))
    opt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=weight_decay, fused=fused or None)
    step = fast.build(net, opt, bf16=True)
    assert step is not None and step.fused is fused
    x, y = torch.randn(128, 40), torch.randint(0, 4, (128,))
    for _ in range(3):
        step.step(x, y)
    step.sync()
    return [p.detach().clone() for p in net.parameters()]


def test_the_fast_engines_fused_adam_is_torchs_adam_with_l2_weight_decay_in_other_rounding():
    """Fused Adam adds weight_decay * param to the gradient as the for-loop Adam does (not AdamW's decay):
    the same step within float rounding, but not the same bits (the fused kernel really ran)."""
    fused, loop = _fast_adam_step(True, 0.1), _fast_adam_step(False, 0.1)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(fused, loop))
    assert not all(torch.equal(a, b) for a, b in zip(fused, loop))
    undecayed = _fast_adam_step(True, 0.0)
    assert not all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(fused, undecayed)), "decay applied"
