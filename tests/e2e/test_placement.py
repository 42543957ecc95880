"""Deletion-aware placement (`sharding.placement`): rows placed by their deletion prior stay exact,
`fit(D).delete(S) == fit(D \\ S)` with the same priors bit for bit, rows never move, `add(..., risk=...)`
puts rows where `fit` would, the estimate is the receipt, and bad priors are refused with nothing written."""

import numpy as np
import pytest
from helpers import tiny_config, tiny_data, weights_equal

from shards.store import read_slice
from sisa import SisaEnsemble
from sisa.errors import ConfigError, DataError

PLACED = {
    "late": tiny_config(sharding={"shards": 3, "slices": 3, "placement": "late_slices", "risk_threshold": 0.2}),
    "isolated": tiny_config(sharding={"shards": 4, "slices": 2, "placement": "isolated_shards", "isolated_shards": 1}),
}


def priors(ids, share=0.15, seed=1):
    rng = np.random.default_rng(seed)
    return np.where(rng.random(len(ids)) < share, 0.5, 0.01)


def fit(cfg, wd, X, y, ids, risk, executor="inprocess"):
    return SisaEnsemble.from_config(cfg, wd, executor=executor).fit(X, y, ids=ids, risk=risk)


def places(ens) -> dict:
    """{id: (shard, slice, risk)} of every training row, read from the slice files."""
    out = {}
    for s, sh in enumerate(ens.manifest.shards):
        for j, e in enumerate(sh.slices):
            rows = read_slice(ens._ctx.storage(), e.to_dict())
            for i, r in zip(rows["id"].tolist(), rows["risk"].tolist()):
                out[i] = (s, j, r)
    return out


@pytest.mark.parametrize("name", sorted(PLACED))
def test_delete_equals_fit_without_rows_and_rows_never_move(tmp_path, name):
    cfg = PLACED[name]
    X, y, ids = tiny_data(n=240)
    risk = priors(ids)
    a = fit(cfg, tmp_path / "a", X, y, ids, risk)
    before = places(a)
    likely = [i for i, r in zip(ids.tolist(), risk) if r >= 0.2]
    shards, slices = cfg["sharding"]["shards"], cfg["sharding"]["slices"]
    for i in likely:  # the likely rows are where the placement puts them
        s, j, _ = before[i]
        assert (j == slices - 1) if name == "late" else (s == shards - 1)
    gone = likely[:3] + [i for i in ids.tolist() if i not in likely][:2]
    plan = a.estimate_deletion_cost(gone)
    r = a.delete(gone)
    assert r.cost["sample_epochs"] == plan.sample_epochs  # the estimate is the receipt
    assert r.cost["expected_sample_epochs"] == pytest.approx(plan.expected_sample_epochs)
    after = places(a)
    assert after == {i: p for i, p in before.items() if i not in gone}  # nothing else moved
    keep = ~np.isin(ids, gone)
    b = fit(cfg, tmp_path / "b", X[keep], y[keep], ids[keep], risk[keep])
    assert weights_equal(a, b)
    assert [e.sha256 for sh in a.manifest.shards for e in sh.slices] == [
        e.sha256 for sh in b.manifest.shards for e in sh.slices
    ]


def test_one_deletion_of_a_likely_row_retrains_only_the_last_stage(tmp_path):
    X, y, ids = tiny_data(n=240)
    risk = priors(ids)
    ens = fit(PLACED["late"], tmp_path / "a", X, y, ids, risk)
    likely = next(i for i, r in zip(ids.tolist(), risk) if r >= 0.2)
    assert ens.shard_of(likely)[1] == 2 == ens.shard_of(likely, risk=0.5)[1]
    assert ens.estimate_deletion_cost([likely]).shards == {ens.shard_of(likely)[0]: 3}


def test_add_with_risk_lands_where_fit_puts_it(tmp_path):
    cfg = PLACED["isolated"]
    X, y, ids = tiny_data(n=300)
    risk = priors(ids, seed=4)
    new = np.arange(300) >= 240
    a = fit(cfg, tmp_path / "a", X[~new], y[~new], ids[~new], risk[~new])
    before = places(a)
    r = a.add(X[new], y[new], ids[new], risk=risk[new])
    assert r.kind == "add"
    after = places(a)
    assert all(after[i] == p for i, p in before.items())  # old rows never move
    b = fit(cfg, tmp_path / "b", X, y, ids, risk)
    assert after == places(b) and weights_equal(a, b)


def test_risk_classes_and_a_csv_risk_column(tmp_path):
    cfg = tiny_config(
        sharding={"shards": 3, "slices": 3, "placement": "late_slices", "risk_classes": {"churned": 0.3, "active": 0.01}}
    )
    X, y, ids = tiny_data(n=240)
    names = np.where(priors(ids) > 0.2, "churned", "active")
    a = fit(cfg, tmp_path / "a", X, y, ids, names)
    b = fit(cfg, tmp_path / "b", X, y, ids, np.where(names == "churned", 0.3, 0.01))
    assert weights_equal(a, b)
    import pandas as pd

    df = pd.DataFrame(X, columns=[f"f{k}" for k in range(X.shape[1])])
    df.insert(0, "id", ids)
    df["label"], df["risk"] = y, names
    (tmp_path / "c").mkdir()
    df.to_csv(tmp_path / "c" / "d.csv", index=False)
    c = tiny_config(sharding=cfg["sharding"], data={"source": "csv", "path": "d.csv", "risk_column": "risk"})
    ens = SisaEnsemble.from_config(c, tmp_path / "c").fit()
    assert ens.manifest.feature_names == [f"f{k}" for k in range(X.shape[1])]  # the risk column is no feature
    assert ens.status()["placement"]["prior_mass"] > 0


@pytest.mark.parametrize(
    "risk, match",
    [
        (None, "places rows by their deletion prior"),
        ("short", "entries but there are 240 rows"),
        ("nan", "probability in \\[0, 1\\].*row 7"),
        ("big", "probability in \\[0, 1\\].*row 3 has 1.5"),
        ("names", "unknown class.*'gone'"),
    ],
)
def test_bad_risk_is_refused_and_nothing_written(tmp_path, risk, match):
    X, y, ids = tiny_data(n=240)
    r = priors(ids)
    bad = {
        None: None,
        "short": r[:-1],
        "nan": np.where(np.arange(240) == 7, np.nan, r),
        "big": np.where(np.arange(240) == 3, 1.5, r),
        "names": np.array(["gone"] * 240),
    }[risk]
    with pytest.raises(DataError, match=match):
        fit(PLACED["late"], tmp_path / "a", X, y, ids, bad)
    assert not (tmp_path / "a" / "manifest.json").exists() and not list((tmp_path / "a").rglob("*.npy"))


def test_risk_needs_a_placement_and_the_config_is_checked(tmp_path):
    X, y, ids = tiny_data(n=240)
    with pytest.raises(DataError, match="sharding.placement is uniform"):
        fit(tiny_config(), tmp_path / "a", X, y, ids, priors(ids))
    with pytest.raises(ConfigError, match="isolated_shards < shards"):
        SisaEnsemble.from_config(tiny_config(sharding={"placement": "isolated_shards", "isolated_shards": 3}), tmp_path)
    with pytest.raises(ConfigError, match="new_rows: canonical only, not append: an appended slice .* use new_rows: canonical"):
        SisaEnsemble.from_config(tiny_config(sharding={"placement": "late_slices", "new_rows": "append"}), tmp_path)
    with pytest.raises(ConfigError, match="probabilities in \\[0, 1\\]"):
        SisaEnsemble.from_config(
            tiny_config(sharding={"placement": "late_slices", "risk_classes": {"x": 2.0}}), tmp_path
        )


def test_status_reports_realised_against_expected(tmp_path):
    X, y, ids = tiny_data(n=240)
    risk = priors(ids)
    ens = fit(PLACED["late"], tmp_path / "a", X, y, ids, risk)
    st = ens.status()["placement"]
    assert st["realised"]["requests"] == 0 and st["realised"]["mean_sample_epochs"] is None
    likely = [i for i, r in zip(ids.tolist(), risk) if r >= 0.2]
    costs, expected = [], []
    for i in likely[:2] + [ids[0]]:
        expected.append(ens.estimate_deletion_cost([i]).expected_sample_epochs)
        costs.append(ens.delete([i]).cost["sample_epochs"])
    real = ens.status()["placement"]["realised"]
    assert real["requests"] == 3
    assert real["mean_sample_epochs"] == pytest.approx(np.mean(costs))
    assert real["mean_expected_sample_epochs"] == pytest.approx(np.mean(expected))
    assert real["realised_over_expected"] == pytest.approx(np.mean(costs) / np.mean(expected))
    from sisa.cli.render import status_table

    text = status_table(ens.status())
    assert "placement: late_slices" in text and "over 3 request(s)" in text


@pytest.mark.slow
def test_isolated_shards_exact_on_ray(tmp_path, ray_session):
    cfg = PLACED["isolated"]
    X, y, ids = tiny_data(n=240)
    risk = priors(ids)
    a = fit(cfg, tmp_path / "a", X, y, ids, risk, executor="ray")
    gone = [i for i, r in zip(ids.tolist(), risk) if r >= 0.2][:2] + [ids[5]]
    a.delete(gone)
    keep = ~np.isin(ids, gone)
    b = fit(cfg, tmp_path / "b", X[keep], y[keep], ids[keep], risk[keep])
    assert weights_equal(a, b)
