"""The fast training engine end to end: a new workdir records it, it gives the eager engine's bits (fit,
deletion, Ray), delete equals a fresh fit on it, and a config naming the other engine is refused."""

import pytest
import yaml
from helpers import checkpoint_hashes, fit_ensemble, tiny_config, tiny_data, weights_equal, without

from sisa import SisaEnsemble
from sisa.errors import ConfigError


def engine_cfg(engine, **over):
    cfg = tiny_config(**over)
    if engine is not None:
        cfg["training"] = {**cfg["training"], "engine": engine}
    return cfg


def test_a_new_workdir_trains_with_the_fast_engine_and_records_it(tmp_path):
    X, y, ids = tiny_data(n=150)
    ens = fit_ensemble(tiny_config(), tmp_path / "w", X, y, ids)
    assert ens.manifest.engine == "fast" and ens.config.training.engine == "fast"
    written = yaml.safe_load((tmp_path / "w" / "config.yaml").read_text())
    assert written["training"]["engine"] == "fast"
    assert SisaEnsemble.open(tmp_path / "w").manifest.engine == "fast"


@pytest.mark.parametrize("engine", ["fast", "eager"])
def test_delete_equals_fit_without_the_rows_on_each_engine(tmp_path, engine):
    cfg = engine_cfg(engine, sharding={"shards": 3, "slices": 3})
    X, y, ids = tiny_data(n=300)
    ens = fit_ensemble(cfg, tmp_path / "a", X, y, ids)
    assert ens.manifest.engine == engine
    gone = [i for i in ids.tolist() if ens.shard_of(i)[0] in (0, 2)][:3] + [ids[-1]]
    ens.delete(gone)
    ref = fit_ensemble(cfg, tmp_path / "b", *without(X, y, ids, gone))
    assert weights_equal(ens, ref)
    assert checkpoint_hashes(ens) == checkpoint_hashes(ref), "same checkpoint bytes as a fresh fit without the rows"


def test_fast_and_eager_engines_give_the_same_checkpoints(tmp_path):
    X, y, ids = tiny_data(n=240)
    a = fit_ensemble(engine_cfg("fast"), tmp_path / "fast", X, y, ids)
    b = fit_ensemble(engine_cfg("eager"), tmp_path / "eager", X, y, ids)
    assert weights_equal(a, b)
    assert checkpoint_hashes(a) == checkpoint_hashes(b)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fast_engine_on_ray_equals_inprocess_and_its_deletion_equals_a_fresh_fit(tmp_path, ray_session, precision):
    """On Ray the shards train side by side in several workers; the bits are those of one process, in fp32
    and under training.precision bf16-mixed."""
    cfg = engine_cfg("fast", sharding={"shards": 3, "slices": 4}, training={"precision": precision})
    X, y, ids = tiny_data(n=300)
    ray = fit_ensemble(cfg, tmp_path / "ray", X, y, ids, executor="ray")
    local = fit_ensemble(cfg, tmp_path / "local", X, y, ids)
    assert weights_equal(ray, local) and checkpoint_hashes(ray) == checkpoint_hashes(local)
    gone = [i for i in ids.tolist() if ray.shard_of(i) in ((0, 2), (1, 0))][:2]
    ray.delete(gone)
    ref = fit_ensemble(cfg, tmp_path / "ref", *without(X, y, ids, gone))
    assert weights_equal(ray, ref) and checkpoint_hashes(ray) == checkpoint_hashes(ref)
    ray.close()


def _set_engine(wd, engine):
    path = wd / "config.yaml"
    doc = yaml.safe_load(path.read_text())
    if engine is None:
        doc["training"].pop("engine", None)
    else:
        doc["training"]["engine"] = engine
    path.write_text(yaml.safe_dump(doc))


@pytest.mark.parametrize(("trained", "asked"), [("fast", "eager"), ("eager", "fast")])
def test_a_config_naming_the_other_engine_is_refused(tmp_path, trained, asked):
    X, y, ids = tiny_data(n=120)
    fit_ensemble(engine_cfg(trained), tmp_path / "w", X, y, ids)
    _set_engine(tmp_path / "w", asked)
    with pytest.raises(ConfigError, match=f"trained with training.engine '{trained}'"):
        SisaEnsemble.open(tmp_path / "w")


def test_a_workdir_from_before_the_setting_keeps_training_eager(tmp_path):
    """A workdir whose config and manifest predate training.engine was trained by the eager step: it opens with
    its old hash and every retrain runs eager (the manifest's default), equal to an eager fit."""
    X, y, ids = tiny_data(n=240)
    ens = fit_ensemble(engine_cfg("eager"), tmp_path / "old", X, y, ids)
    hash_before = ens.manifest.training_hash
    ens.close()
    _set_engine(tmp_path / "old", None)
    assert "engine" not in (tmp_path / "old" / "manifest.json").read_text(), "eager is the migration default"
    old = SisaEnsemble.open(tmp_path / "old")
    assert old.config.training.engine is None and old.config.training_hash() == hash_before
    gone = [ids[0], ids[7]]
    receipt = old.delete(gone)
    assert receipt.shards
    ref = fit_ensemble(engine_cfg("eager"), tmp_path / "ref", *without(X, y, ids, gone))
    assert weights_equal(old, ref) and checkpoint_hashes(old) == checkpoint_hashes(ref)
    assert old.manifest.engine == "eager"
