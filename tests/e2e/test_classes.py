"""The class set is part of the config (data.num_classes): a deletion never changes the output space."""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import tiny_config, tiny_data

from sisa import SisaEnsemble
from sisa.config import load_config
from sisa.errors import ConfigError, DataError


def _state_dicts_equal(a, b) -> None:
    assert a.active_shards() == b.active_shards()
    for s in a.active_shards():
        sa, sb = a.load_shard_model(s).state_dict(), b.load_shard_model(s).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].shape == sb[k].shape, f"shard {s} {k}: {tuple(sa[k].shape)} != {tuple(sb[k].shape)}"
            assert torch.equal(sa[k], sb[k]), f"shard {s} {k} differs"


@pytest.mark.parametrize("model", ["mlp", "usermodel:TinyNet"])
def test_deleting_a_whole_class_equals_a_fit_without_it(tmp_path, model):
    X, y, ids = tiny_data(n=180, classes=3)
    cfg = tiny_config(model={"name": model, "kwargs": {"width": 8} if ":" in model else {"hidden": [8]}})
    ens = SisaEnsemble.from_config(cfg, tmp_path / "full").fit(X, y, ids=ids)
    gone = ids[y == 2]  # every row of the highest class
    ens.delete(gone)
    keep = y != 2
    ref = SisaEnsemble.from_config(tmp_path / "full" / "config.yaml", tmp_path / "ref").fit(
        X[keep], y[keep], ids=ids[keep]
    )
    _state_dicts_equal(ens, ref)
    assert ens.predict_proba(X[:5]).shape == ref.predict_proba(X[:5]).shape == (5, 3)
    assert ens.manifest["num_classes"] == ref.manifest["num_classes"] == 3
    written = yaml.safe_load((tmp_path / "full" / "config.yaml").read_text())
    assert written["data"]["num_classes"] == 3, "the inferred class count is written into the workdir's config"

    again = SisaEnsemble.open(tmp_path / "full")  # the hashes in the manifest are those of the config as written
    assert np.array_equal(again.predict_proba(X[:5]), ens.predict_proba(X[:5]))
    on_disk = load_config(tmp_path / "full" / "config.yaml")
    assert ens.manifest["config_hash"] == on_disk.config_hash()
    assert ens.manifest["training_hash"] == on_disk.training_hash()


def test_num_classes_is_part_of_the_training_hash():
    a, b = load_config({"data": {"num_classes": 3}}), load_config({"data": {"num_classes": 4}})
    assert a.training_hash() != b.training_hash()
    assert a.training_hash() != load_config({}).training_hash()


@pytest.mark.parametrize("model", ["mlp", "usermodel:TinyNet"])
def test_pinned_class_count_for_builtin_and_custom_modules(tmp_path, model):
    X, y, ids = tiny_data(n=120, classes=3)
    cfg = tiny_config(data={"num_classes": 5}, model={"name": model, "kwargs": {}})
    ens = SisaEnsemble.from_config(cfg, tmp_path / "w").fit(X, y, ids=ids)
    assert ens.predict_proba(X[:4]).shape == (4, 5)
    assert ens.manifest["num_classes"] == 5
    reopened = SisaEnsemble.open(tmp_path / "w")
    assert reopened.predict_proba(X[:4]).shape == (4, 5)


def test_num_classes_in_model_kwargs_is_a_clear_config_error(tmp_path):
    X, y, ids = tiny_data(n=120)
    for model in ("mlp", "usermodel:TinyNet"):
        with pytest.raises(ConfigError, match="move it to data.num_classes"):
            SisaEnsemble.from_config(tiny_config(model={"name": model, "kwargs": {"num_classes": 3}}), tmp_path / "w")


def test_input_shape_in_model_kwargs_is_a_clear_config_error(tmp_path):
    X, y, ids = tiny_data(n=120)
    cfg = tiny_config(model={"name": "usermodel:TinyNet", "kwargs": {"input_shape": [6]}})
    with pytest.raises(ConfigError, match="model.kwargs sets input_shape, which sisa passes"):
        SisaEnsemble.from_config(cfg, tmp_path / "w").fit(X, y, ids=ids)


def test_labels_beyond_the_pinned_class_count_are_a_data_error(tmp_path):
    X, y, ids = tiny_data(n=120, classes=3)
    with pytest.raises(DataError, match=r"labels go up to 2 but data.num_classes is 2"):
        SisaEnsemble.from_config(tiny_config(data={"num_classes": 2}), tmp_path / "w").fit(X, y, ids=ids)
    assert not (tmp_path / "w" / "manifest.json").exists()


def test_a_refit_of_the_same_object_infers_the_class_count_again(tmp_path):
    X, y, ids = tiny_data(n=120, classes=3)
    ens = SisaEnsemble.from_config(tiny_config(), tmp_path / "w")
    ens.fit(X[y < 2], y[y < 2], ids=ids[y < 2])
    assert ens.manifest["num_classes"] == 2 and ens.config.data.num_classes == 2
    ens.fit(X, y, ids=ids, overwrite=True)  # the count was inferred, not given: more classes are fine
    assert ens.manifest["num_classes"] == 3


def test_a_workdir_written_before_data_num_classes_still_opens(tmp_path):
    X, y, ids = tiny_data(n=120)
    ens = SisaEnsemble.from_config(tiny_config(), tmp_path / "w").fit(X, y, ids=ids)
    wd = tmp_path / "w"
    # what an older sisa wrote: no data.num_classes in config.yaml, the old hash in the manifest
    doc = yaml.safe_load((wd / "config.yaml").read_text())
    old_keys = {  # the keys of these sections that sisa wrote before data.num_classes (later ones: defaults)
        "data": {"source", "path", "id_column", "label_column", "test_fraction", "synthetic"},
        "sharding": {"shards", "slices"},
        "model": {"name", "kwargs"},
        "training": {"epochs", "schedule", "batch_size", "optimizer", "lr", "weight_decay", "momentum", "lr_gamma", "threads"},
    }
    for section, keep in old_keys.items():
        doc[section] = {k: v for k, v in doc[section].items() if k in keep}
    (wd / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    manifest = json.loads((wd / "manifest.json").read_text())
    old = {k: doc[k] for k in ("seed", "sharding", "model", "training")}
    manifest["training_hash"] = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    (wd / "manifest.json").write_text(json.dumps(manifest))
    again = SisaEnsemble.open(wd)
    assert again.config.data.num_classes is None
    assert np.array_equal(again.predict_proba(X[:5]), ens.predict_proba(X[:5]))
    receipt = again.delete([ids[0]])
    assert receipt.shards and again.predict_proba(X[:5]).shape == (5, 3)


def test_parquet_fit_writes_the_class_count_and_checks_labels(tmp_path):
    X, y, ids = tiny_data(n=150, classes=3)
    wd = tmp_path / "pq"
    (wd / "in").mkdir(parents=True)
    cols = {"id": ids, **{f"f{k}": X[:, k] for k in range(X.shape[1])}, "label": y}
    pq.write_table(pa.table(cols), wd / "in" / "train.parquet")
    cfg = tiny_config(data={"source": "parquet", "path": "in/train.parquet", "test_fraction": 0.0})
    with pytest.raises(DataError, match=r"labels go up to 2 but data.num_classes is 2"):
        SisaEnsemble.from_config({**cfg, "data": {**cfg["data"], "num_classes": 2}}, wd).fit()
    assert not (wd / "manifest.json").exists()
    ens = SisaEnsemble.from_config(cfg, wd).fit()
    assert yaml.safe_load((wd / "config.yaml").read_text())["data"]["num_classes"] == 3
    ens.delete(ids[y == 2])
    keep = y != 2
    ref = SisaEnsemble.from_config(wd / "config.yaml", tmp_path / "ref").fit(X[keep], y[keep], ids=ids[keep])
    _state_dicts_equal(ens, ref)
    assert ens.predict_proba(X[:3]).shape == ref.predict_proba(X[:3]).shape == (3, 3)
