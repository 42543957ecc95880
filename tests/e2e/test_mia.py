"""Membership inference: after exact deletion the deleted rows look like rows never seen, retained rows
still show the membership signal, the approximate baseline is reported next to it, and it all goes to
MLflow with a ROC plot."""

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from sklearn.datasets import make_classification
from sklearn.metrics import roc_auc_score

from sisa import SisaEnsemble
from sisa.audit.mia import EXACT, GA, MONO, auc, bootstrap_auc, deletion_cost, log_audit, membership_audit


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    """An MLP that overfits noisy synthetic rows (so membership shows), 100 rows deleted exactly."""
    X, y = make_classification(
        n_samples=1600, n_features=30, n_informative=6, n_redundant=0, n_classes=4, flip_y=0.1, class_sep=0.8,
        random_state=1,
    )  # fmt: skip
    X, ids = X.astype(np.float32), np.arange(len(y))
    tr, te, pop = slice(0, 600), slice(600, 900), slice(900, 1600)
    cfg = {
        "name": "mia",
        "seed": 5,
        "sharding": {"shards": 2, "slices": 1},
        "model": {"name": "mlp", "kwargs": {"hidden": [128]}},
        "training": {"epochs": 60, "batch_size": 32, "lr": 0.005},
        "tracking": {"enabled": True},
        "cluster": {"executor": "inprocess"},
    }
    ens = SisaEnsemble.from_config(cfg, tmp_path_factory.mktemp("mia") / "w")
    ens.fit(X[tr], y[tr], ids=ids[tr], eval_set=(X[te], y[te]))
    gone = ids[tr][::6]
    ens.delete(gone.tolist())
    manifest = (ens.workdir.path / "manifest.json").read_bytes()
    rep = membership_audit(
        ens._ctx,
        ens.manifest,
        deleted=(X[gone], y[gone]),
        population=(X[pop], y[pop]),
        references=4,
        exact_cost=deletion_cost(ens._ctx),
    )
    return ens, rep, manifest


def test_deleted_rows_look_held_out_and_retained_rows_look_like_members(audit):
    ens, rep, _ = audit
    assert rep.settings["deleted"] == 100 and rep.settings["heldout"] == 300 and rep.settings["references"] == 4
    for attack in ("loss", "reference"):
        kept, gone = rep.get("retained", attack), rep.get("deleted", attack)
        assert kept.auc > 0.62 and kept.ci_low > 0.55 and kept.pvalue < 0.01, kept
        assert abs(gone.auc - 0.5) < 0.1 and gone.pvalue > 0.01, gone
        assert gone.ci_low < gone.auc < gone.ci_high
    assert rep.ks[EXACT]["retained"]["pvalue"] < 1e-6
    assert rep.ks[EXACT]["deleted"]["pvalue"] > 0.01
    assert "exact ensemble: deleted rows are" in rep.text()


def test_approximate_baseline_is_labelled_and_leaks_before_it_unlearns(audit):
    ens, rep, manifest = audit
    b = rep.baseline
    assert "NOT exact" in b["label"] and "NOT exact" in GA
    assert b["train_rows"] == 600 and b["forget_rows"] == 100
    assert b["ascent_steps"] > 0 and b["reached_target"] and b["forget_loss_after"] >= b["target_loss"]
    assert b["unlearn_sample_gradients"] == b["ascent_steps"] * 32
    assert b["retrain_sample_epochs"] == 500 * 60
    assert rep.get("deleted", "loss", MONO).auc > 0.7, "the monolithic model remembers the rows it trained on"
    assert {r.model for r in rep.results} == {EXACT, MONO, GA}
    assert set(rep.accuracy) == {EXACT, MONO, GA}
    assert rep.exact_cost["rows_deleted"] == 100 and rep.exact_cost["sample_epochs"] > 0
    assert (ens.workdir.path / "manifest.json").read_bytes() == manifest, "the audit and the baseline change nothing"


def test_audit_is_logged_to_mlflow_with_a_roc_plot(audit):
    ens, rep, _ = audit
    run_id = log_audit(ens._ctx, ens.manifest, rep)
    client = MlflowClient(f"sqlite:///{ens.workdir.path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.tags["sisa.operation"] == "audit"
    m = run.data.metrics
    assert m["mia_exact_loss_deleted_auc"] == pytest.approx(rep.get("deleted").auc)
    assert m["mia_exact_reference_retained_ci_low"] == pytest.approx(rep.get("retained", "reference").ci_low)
    assert "ks_exact_deleted_pvalue" in m and "approx_ascent_steps" in m
    arts = [a.path for a in client.list_artifacts(run_id, "audit")]
    assert {"audit/roc.png", "audit/mia.json"} <= set(arts)
    png = client.download_artifacts(run_id, "audit/roc.png", str(ens.workdir.path.parent))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_auc_and_bootstrap_on_known_distributions():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=400), rng.normal(size=300)
    assert auc(a, b) == pytest.approx(roc_auc_score(np.r_[np.ones(400), np.zeros(300)], np.r_[a, b]))
    lo, hi, p = bootstrap_auc(a, b, 500)
    assert lo < 0.5 < hi and p > 0.05
    assert auc(a + 10, b) == 1.0 and bootstrap_auc(a + 10, b, 200)[2] < 0.01
    assert auc(np.zeros(5), np.zeros(7)) == 0.5
    shifted = auc(a + 0.5, b)
    lo, hi, _ = bootstrap_auc(a + 0.5, b, 500)
    assert 0.6 < shifted < 0.7 and lo < shifted < hi
