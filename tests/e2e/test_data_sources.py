"""User data from files named in the config (.npz, CSV) and the built-in sets; same weights as arrays."""

import numpy as np
import pytest
from helpers import tiny_config, tiny_data, weights_equal

from sisa import SisaEnsemble
from sisa.errors import DataError


def _write_csv(path, X, y, ids):
    cols = ["id", "label"] + [f"f{i}" for i in range(X.shape[1])]
    lines = [",".join(cols)] + [
        ",".join([str(i), str(int(t))] + [repr(float(v)) for v in row]) for i, t, row in zip(ids, y, X)
    ]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("fmt", ["npz", "csv"])
def test_file_sources_match_arrays(tmp_path, fmt):
    X, y, ids = tiny_data(n=150)
    wd = tmp_path / "w"
    wd.mkdir()
    if fmt == "npz":
        np.savez(wd / "train.npz", X=X, y=y, ids=ids)
    else:
        _write_csv(wd / "train.csv", X, y, ids)
    cfg = tiny_config(data={"source": fmt, "path": f"train.{fmt}", "test_fraction": 0.0})
    from_file = SisaEnsemble.from_config(cfg, wd).fit()
    from_arrays = SisaEnsemble.from_config(tiny_config(), tmp_path / "arrays").fit(X, y, ids=ids)
    assert weights_equal(from_file, from_arrays)


def test_csv_missing_column_says_which_setting(tmp_path):
    X, y, ids = tiny_data(n=60)
    wd = tmp_path / "w"
    wd.mkdir()
    _write_csv(wd / "d.csv", X, y, ids)
    cfg = tiny_config(data={"source": "csv", "path": "d.csv", "label_column": "target"})
    with pytest.raises(DataError, match="no column 'target'.*data.label_column"):
        SisaEnsemble.from_config(cfg, wd).fit()


def test_builtin_sets_hold_out_a_stable_test_split(tmp_path):
    cfg = tiny_config(
        data={
            "source": "synthetic",
            "synthetic": {"n_samples": 300, "n_features": 6, "n_informative": 4, "n_classes": 3},
        }
    )
    ens = SisaEnsemble.from_config(cfg, tmp_path / "w").fit()
    st = ens.status()
    assert 200 < st["rows"] < 280 and ens.manifest["metrics"]["eval_rows"] == 300 - st["rows"]
    assert st["ensemble_accuracy"] is not None


def test_no_data_says_what_to_pass(tmp_path):
    with pytest.raises(DataError, match=r"pass fit\(X, y, ids=...\) or set data.source"):
        SisaEnsemble.from_config(tiny_config(), tmp_path / "w").fit()
