"""training.precision: bf16-mixed end to end: the workdir records it, a deletion equals a fresh fit without the
rows under it (in process here; on Ray, beside other shards training, in test_fast_training.py), it is part of the training hash, and a
config naming the other precision is refused before anything is written."""

import numpy as np
import pytest
import yaml
from helpers import checkpoint_hashes, fit_ensemble, tiny_config, tiny_data, weights_equal, without

from sisa import SisaEnsemble
from sisa.config import load_config
from sisa.errors import ConfigError, WorkdirError

BF16 = {"training": {"precision": "bf16-mixed"}}


def bf16_config(**over):
    cfg = tiny_config(**over)
    cfg["training"] = {**cfg["training"], "precision": "bf16-mixed"}
    return cfg


@pytest.mark.parametrize("engine", ["fast", "eager"])
def test_bf16_delete_equals_a_fresh_bf16_fit_without_the_rows(tmp_path, engine):
    cfg = bf16_config(training={"engine": engine})
    X, y, ids = tiny_data(n=300)
    ens = fit_ensemble(cfg, tmp_path / "a", X, y, ids)
    assert ens.manifest.precision == "bf16-mixed" and ens.manifest.engine == engine
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["training"]["precision"] == "bf16-mixed"
    assert '"precision":"bf16-mixed"' in (tmp_path / "a" / "manifest.json").read_text()
    gone = [i for i in ids.tolist() if ens.shard_of(i)[0] in (0, 2)][:3] + [ids[-1]]
    ens.delete(gone)
    ref = fit_ensemble(cfg, tmp_path / "b", *without(X, y, ids, gone))
    assert weights_equal(ens, ref) and checkpoint_hashes(ens) == checkpoint_hashes(ref)
    fp32 = fit_ensemble(tiny_config(training={"engine": engine}), tmp_path / "fp32", *without(X, y, ids, gone))
    assert not weights_equal(ens, fp32), "bf16-mixed must compute in bf16, not fp32 under another name"
    assert np.isfinite(ens.predict_proba(X[:4])).all()


def _state(wd):
    return {p.relative_to(wd): p.read_bytes() for p in sorted(wd.rglob("*")) if p.is_file() and "-shm" not in p.name}


@pytest.mark.parametrize(("trained", "asked"), [("bf16-mixed", "32-true"), ("32-true", "bf16-mixed")])
def test_a_config_naming_the_other_precision_is_refused_and_nothing_is_written(tmp_path, trained, asked):
    X, y, ids = tiny_data(n=120)
    wd = tmp_path / "w"
    fit_ensemble(tiny_config(training={"precision": trained}), wd, X, y, ids).close()
    before = _state(wd)
    msg = (
        f"trained with training.precision '{trained}', but the config says '{asked}'.*Set training.precision: {trained}"
    )
    doc = yaml.safe_load((wd / "config.yaml").read_text())
    doc["training"]["precision"] = asked
    (wd / "config.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=msg):
        SisaEnsemble.open(wd)
    after = _state(wd)
    edited = [p for p in after if p.name == "config.yaml"]
    assert {p: b for p, b in after.items() if p not in edited} == {p: b for p, b in before.items() if p not in edited}


def test_precision_is_checked_on_load_and_part_of_the_training_hash():
    with pytest.raises(ConfigError, match="training.precision") as e:
        load_config({"training": {"precision": "bf16"}})
    assert "bf16-mixed" in str(e.value) and "32-true" in str(e.value)
    fp32, bf16 = load_config({}), load_config(BF16)
    assert fp32.training.precision == "32-true"
    assert fp32.training_hash() == load_config({"training": {"precision": "32-true"}}).training_hash()
    assert bf16.training_hash() != fp32.training_hash()


def test_a_users_module_trains_under_lightnings_bf16_plugin_and_deletes_exactly(tmp_path):
    cfg = bf16_config(model={"name": "usermodel:TinyNet", "kwargs": {}}, sharding={"shards": 2, "slices": 2})
    X, y, ids = tiny_data(n=120)
    ens = fit_ensemble(cfg, tmp_path / "a", X, y, ids)
    gone = [ids[4], ids[50]]
    ens.delete(gone)
    ref = fit_ensemble(cfg, tmp_path / "b", *without(X, y, ids, gone))
    assert weights_equal(ens, ref) and checkpoint_hashes(ens) == checkpoint_hashes(ref)
    fp32 = fit_ensemble(
        {**cfg, "training": {**cfg["training"], "precision": "32-true"}}, tmp_path / "c", *without(X, y, ids, gone)
    )
    assert checkpoint_hashes(fp32) != checkpoint_hashes(ref), "the Trainer ran with precision bf16-mixed"


def test_a_bf16_start_history_equals_a_fresh_bf16_fit_and_the_audit_retrains_in_bf16(tmp_path):
    X, y, ids = tiny_data(n=180)
    Xb, yb, _ = tiny_data(n=60, seed=1)
    cfg = bf16_config(sharding={"new_rows": "append"})

    def fit(wd, X, y, ids, cfg=cfg):
        return SisaEnsemble.from_config(cfg, tmp_path / wd, executor="inprocess").fit(X, y, ids=ids, base=(Xb, yb))

    a = fit("a", X[:150], y[:150], ids[:150])
    a.add(X[150:], y[150:], ids[150:])
    gone = [ids[2], ids[160]]
    a.delete(gone)
    a.compact()
    b = fit("b", *without(X, y, ids, gone))
    assert weights_equal(a, b) and checkpoint_hashes(a) == checkpoint_hashes(b)
    fp32 = fit("c", X, y, ids, cfg=tiny_config(sharding={"new_rows": "append"}))
    assert fp32.manifest.base.sha256 != a.manifest.base.sha256 == b.manifest.base.sha256, "the start trains in bf16"
    report = a.verify()
    assert report.ok, report.text()


@pytest.mark.parametrize("other", ["precision", "lr"])
def test_a_handle_made_from_another_config_is_refused_before_anything_is_written(tmp_path, other):
    X, y, ids = tiny_data(n=120)
    wd = tmp_path / "w"
    fit_ensemble(tiny_config(sharding={"new_rows": "append"}), wd, X[:100], y[:100], ids[:100]).close()
    SisaEnsemble.from_config(tiny_config(sharding={"new_rows": "append"}), wd, executor="inprocess").repair()
    before = _state(wd)
    cfg = bf16_config() if other == "precision" else tiny_config(training={"lr": 0.02})
    cfg["sharding"]["new_rows"] = "append"
    err, msg = (ConfigError, "training.precision '32-true'") if other == "precision" else (WorkdirError, "does not match")
    ops = {
        "delete": lambda e: e.delete([ids[3]]),
        "add": lambda e: e.add(X[100:], y[100:], ids[100:]),
        "compact": lambda e: e.compact(),
        "repair": lambda e: e.repair(),
    }
    for name, op in ops.items():
        with pytest.raises(err, match=msg):
            op(SisaEnsemble.from_config(cfg, wd, executor="inprocess"))
        assert _state(wd) == before, f"{name} wrote before it refused"
