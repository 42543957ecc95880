"""The fast training engine end to end: a new workdir records it, it gives the eager engine's bits (fit,
deletion, Ray), delete equals a fresh fit on it, and a config naming the other engine is refused."""

import numpy as np
import pytest
import yaml
from helpers import tiny_config, tiny_data, weights_equal

from sisa import SisaEnsemble
from sisa.errors import ConfigError


def fit(cfg, wd, X, y, ids, executor="inprocess"):
    return SisaEnsemble.from_config(cfg, wd, executor=executor).fit(X, y, ids=ids)


def drop(X, y, ids, gone):
    keep = ~np.isin(ids, list(gone))
    return X[keep], y[keep], ids[keep]


def ckpts(ens):
    return [[c.sha256 for c in sh.checkpoints] for sh in ens.manifest.shards]


def engine_cfg(engine, **over):
    cfg = tiny_config(**over)
    if engine is not None:
        cfg["training"] = {**cfg["training"], "engine": engine}
    return cfg


def test_a_new_workdir_trains_with_the_fast_engine_and_records_it(tmp_path):
    X, y, ids = tiny_data(n=150)
    ens = fit(tiny_config(), tmp_path / "w", X, y, ids)
    assert ens.manifest.engine == "fast" and ens.config.training.engine == "fast"
    written = yaml.safe_load((tmp_path / "w" / "config.yaml").read_text())
    assert written["training"]["engine"] == "fast"
    assert SisaEnsemble.open(tmp_path / "w").manifest.engine == "fast"


@pytest.mark.parametrize("engine", ["fast", "eager"])
def test_delete_equals_fit_without_the_rows_on_each_engine(tmp_path, engine):
    cfg = engine_cfg(engine, sharding={"shards": 3, "slices": 3})
    X, y, ids = tiny_data(n=300)
    ens = fit(cfg, tmp_path / "a", X, y, ids)
    assert ens.manifest.engine == engine
    gone = [i for i in ids.tolist() if ens.shard_of(i)[0] in (0, 2)][:3] + [ids[-1]]
    ens.delete(gone)
    ref = fit(cfg, tmp_path / "b", *drop(X, y, ids, gone))
    assert weights_equal(ens, ref)
    assert ckpts(ens) == ckpts(ref), "same checkpoint bytes as a fresh fit without the rows"


def test_fast_and_eager_engines_give_the_same_checkpoints(tmp_path):
    X, y, ids = tiny_data(n=240)
    a = fit(engine_cfg("fast"), tmp_path / "fast", X, y, ids)
    b = fit(engine_cfg("eager"), tmp_path / "eager", X, y, ids)
    assert weights_equal(a, b)
    assert ckpts(a) == ckpts(b)


def test_fast_engine_on_ray_equals_inprocess_and_its_deletion_equals_a_fresh_fit(tmp_path, ray_session):
    cfg = engine_cfg("fast", sharding={"shards": 3, "slices": 4})
    X, y, ids = tiny_data(n=300)
    ray = fit(cfg, tmp_path / "ray", X, y, ids, executor="ray")
    local = fit(cfg, tmp_path / "local", X, y, ids)
    assert weights_equal(ray, local) and ckpts(ray) == ckpts(local)
    gone = [i for i in ids.tolist() if ray.shard_of(i) in ((0, 2), (1, 0))][:2]
    ray.delete(gone)
    ref = fit(cfg, tmp_path / "ref", *drop(X, y, ids, gone))
    assert weights_equal(ray, ref) and ckpts(ray) == ckpts(ref)
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
    fit(engine_cfg(trained), tmp_path / "w", X, y, ids)
    _set_engine(tmp_path / "w", asked)
    with pytest.raises(ConfigError, match=f"trained with training.engine '{trained}'"):
        SisaEnsemble.open(tmp_path / "w")


def test_a_workdir_from_before_the_setting_keeps_training_eager(tmp_path):
    """A workdir whose config and manifest predate training.engine was trained by the eager step: it opens with
    its old hash and every retrain runs eager (the manifest's default), equal to an eager fit."""
    X, y, ids = tiny_data(n=240)
    ens = fit(engine_cfg("eager"), tmp_path / "old", X, y, ids)
    hash_before = ens.manifest.training_hash
    ens.close()
    _set_engine(tmp_path / "old", None)
    assert "engine" not in (tmp_path / "old" / "manifest.json").read_text(), "eager is the migration default"
    old = SisaEnsemble.open(tmp_path / "old")
    assert old.config.training.engine is None and old.config.training_hash() == hash_before
    gone = [ids[0], ids[7]]
    receipt = old.delete(gone)
    assert receipt.shards
    ref = fit(engine_cfg("eager"), tmp_path / "ref", *drop(X, y, ids, gone))
    assert weights_equal(old, ref) and ckpts(old) == ckpts(ref)
    assert old.manifest.engine == "eager"
