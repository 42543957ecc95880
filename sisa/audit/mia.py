"""Membership-inference audit: can an attacker tell the deleted rows from rows the model never saw?

Three groups are scored by the deployed ensemble (``predict_proba``): retained training rows, deleted rows
and held-out rows never trained on. Two attacks, each giving a membership score per row:
  - ``loss``: the loss-threshold attack (Yeom et al., CSF 2018), score = -cross-entropy of the true label;
  - ``reference``: offline LiRA (Carlini et al., S&P 2022; difficulty calibration, Watson et al., ICLR 2022):
    K reference ensembles shaped like the target, trained on a population disjoint from all three groups,
    give the distribution of each row's logit confidence when it is *not* a member; score = the target's
    logit confidence standardised by it. Removing per-row difficulty makes it the stronger attack on models
    that generalise well; on heavily overfit models the plain loss attack is about as strong.
For each attack, the AUC of retained-vs-held-out and deleted-vs-held-out rows with percentile-bootstrap
confidence intervals, and a two-sample KS test of deleted vs held-out losses (scipy). For exact deletion the
deleted rows are indistinguishable from held-out ones (AUC within noise of 0.5), while retained rows show
the usual membership signal. With a baseline, the same attacks are run on a monolithic model before and
after APPROXIMATE gradient-ascent unlearning (`sisa.audit.approx`, not exact). `log_audit` logs everything to
MLflow as an "audit" run with a ROC plot.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from sisa.audit import approx

EXACT = "exact ensemble"
MONO = "monolithic, before unlearning"
GA = "monolithic + gradient ascent (NOT exact)"
ATTACKS = ("loss", "reference")


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a member > score of a non-member), ties counting half (Mann-Whitney U / n1 n2)."""
    from scipy.stats import rankdata

    r = rankdata(np.concatenate([pos, neg]))
    n1, n2 = len(pos), len(neg)
    return float((r[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n2))


def bootstrap_auc(pos, neg, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Percentile-bootstrap CI of the AUC (members and non-members resampled independently), and the
    two-sided bootstrap p-value of AUC = 0.5."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(seed)
    n1, n2 = len(pos), len(neg)
    P = pos[rng.integers(0, n1, (n_boot, n1))]
    N = neg[rng.integers(0, n2, (n_boot, n2))]
    r = rankdata(np.concatenate([P, N], axis=1), axis=1)
    a = (r[:, :n1].sum(1) - n1 * (n1 + 1) / 2) / (n1 * n2)
    lo, hi = np.quantile(a, [(1 - level) / 2, 1 - (1 - level) / 2])
    p = min(1.0, 2 * min((a <= 0.5).mean(), (a >= 0.5).mean()) + 1 / n_boot)
    return float(lo), float(hi), float(p)


def row_loss(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0))


def logit_conf(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    c = np.clip(p[np.arange(len(y)), y].astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(c) - np.log1p(-c)


@dataclass
class AttackResult:
    model: str
    attack: str
    group: str  # members scored against the held-out rows: "retained" or "deleted"
    auc: float
    ci_low: float
    ci_high: float
    pvalue: float  # bootstrap, two-sided, of AUC = 0.5
    members: int
    nonmembers: int


@dataclass
class MIAReport:
    results: list[AttackResult] = field(default_factory=list)
    ks: dict = field(default_factory=dict)  # model -> group -> {"statistic", "pvalue"} (losses vs held-out)
    mean_loss: dict = field(default_factory=dict)  # model -> group -> mean cross-entropy
    accuracy: dict = field(default_factory=dict)  # model -> accuracy on the held-out rows
    baseline: dict | None = None  # approx.ApproxResult.to_dict()
    exact_cost: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict, repr=False)  # (model, attack, group) -> (fpr, tpr)
    seconds: float = 0.0

    def get(self, group: str, attack: str = "loss", model: str = EXACT) -> AttackResult:
        return next(r for r in self.results if (r.model, r.attack, r.group) == (model, attack, group))

    def deleted_indistinguishable(self, alpha: float = 0.05) -> bool:
        """No test tells the deleted rows from the held-out rows at family-wise level ``alpha``: every
        attack's AUC p-value and the KS p-value are >= alpha / (number of tests) (Bonferroni)."""
        ps = [r.pvalue for r in self.results if r.model == EXACT and r.group == "deleted"]
        ps.append(self.ks[EXACT]["deleted"]["pvalue"])
        return min(ps) >= alpha / len(ps)

    def metrics(self) -> dict:
        out = {}
        short = {EXACT: "exact", MONO: "mono", GA: "approx_ga"}
        for r in self.results:
            k = f"mia_{short[r.model]}_{r.attack}_{r.group}"
            out.update({f"{k}_auc": r.auc, f"{k}_ci_low": r.ci_low, f"{k}_ci_high": r.ci_high})
        for m, groups in self.ks.items():
            for g, v in groups.items():
                out[f"ks_{short[m]}_{g}_statistic"], out[f"ks_{short[m]}_{g}_pvalue"] = v["statistic"], v["pvalue"]
        out.update({f"heldout_accuracy_{short[m]}": a for m, a in self.accuracy.items()})
        if self.baseline:
            b = self.baseline
            out.update({f"approx_{k}": float(v) for k, v in b.items() if isinstance(v, (int, float))})
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("curves")
        d["deleted_indistinguishable"] = self.deleted_indistinguishable()
        return d

    def text(self) -> str:
        s = self.settings
        lines = [
            f"membership inference: {s.get('retained')} retained, {s.get('deleted')} deleted, {s.get('heldout')} "
            f"held-out rows; {s.get('references')} reference models; 95% bootstrap CIs ({s.get('n_boot')} resamples)",
            f"{'model':42s} {'attack':9s} {'members':8s} {'AUC':>6s}  95% CI          p(AUC=0.5)",
        ]
        for r in self.results:
            lines.append(
                f"{r.model:42s} {r.attack:9s} {r.group:8s} {r.auc:6.3f}  [{r.ci_low:.3f}, {r.ci_high:.3f}]  {r.pvalue:.3g}"
            )
        for m, groups in self.ks.items():
            for g, v in groups.items():
                lines.append(f"KS {g} vs held-out losses, {m}: D = {v['statistic']:.3f}, p = {v['pvalue']:.3g}")
        for m, a in self.accuracy.items():
            lines.append(f"held-out accuracy, {m}: {a:.4f}")
        if self.baseline:
            b = self.baseline
            lines.append(
                f"{b['label']}: {b['ascent_steps']} ascent steps ({b['unlearn_sample_gradients']} sample-gradients, "
                f"{b['unlearn_seconds']:.2f}s) vs {b['retrain_sample_epochs']} sample-epochs to retrain it exactly; "
                f"deleted-row loss {b['forget_loss_before']:.3f} -> {b['forget_loss_after']:.3f} "
                f"(held-out {b['target_loss']:.3f})"
            )
        if self.exact_cost:
            c = self.exact_cost
            lines.append(
                f"exact deletion (SISA, {c.get('requests')} receipt(s), {c.get('rows_deleted')} rows): "
                f"{c.get('sample_epochs')} sample-epochs, {c.get('seconds', 0):.2f}s"
            )
        verdict = "indistinguishable from" if self.deleted_indistinguishable() else "DISTINGUISHABLE from"
        lines.append(f"exact ensemble: deleted rows are {verdict} held-out rows (all tests, Bonferroni, 5%)")
        return "\n".join(lines)


def deletion_cost(ctx) -> dict:
    """What the exact deletions cost, summed over the receipts in the ledger."""
    from sisa.ledger import Ledger

    path = ctx.workdir.path / "ledger.db"
    recs = [r["receipt"] for r in Ledger(path).requests() if r["receipt"]] if path.exists() else []
    return {
        "requests": len(recs),
        "rows_deleted": sum(r.get("rows_deleted", 0) for r in recs),
        "sample_epochs": sum(r.get("cost", {}).get("sample_epochs", 0) for r in recs),
        "seconds": sum(r.get("wall_seconds", 0.0) for r in recs),
    }


def live_rows(ctx, m, shards=None) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) of every row the live slices of manifest ``m`` hold (active shards by default)."""
    from shards.store import read_slice

    store = ctx.storage()
    parts = [
        read_slice(store, e.to_dict())
        for s in (ctx.active_shards(m) if shards is None else shards)
        for e in m.shards[s].slices
    ]
    parts = [p for p in parts if len(p)]
    if not parts:
        return np.zeros((0, *m.input_shape), np.float32), np.zeros(0, np.int64)
    return np.concatenate([np.ascontiguousarray(p["x"]) for p in parts]), np.concatenate([p["y"] for p in parts])


def heldout_rows(ctx) -> tuple[np.ndarray, np.ndarray]:
    from sisa import evalfile

    rows = evalfile.read(ctx.workdir.path)
    if rows is None:
        from sisa.errors import DataError

        path = ctx.workdir.path / evalfile.NAME
        raise DataError(f"{path} does not exist: pass held-out rows (heldout=(X, y), or --mia-heldout FILE.npz)")
    return np.ascontiguousarray(rows["x"]), rows["y"]


def _take(X, y, idx):
    return X[idx], y[idx]


def membership_audit(
    ctx,
    m,
    deleted: tuple[np.ndarray, np.ndarray],
    heldout: tuple[np.ndarray, np.ndarray] | None = None,
    retained: tuple[np.ndarray, np.ndarray] | None = None,
    population: tuple[np.ndarray, np.ndarray] | None = None,
    references: int = 4,
    baseline: bool = True,
    exact_cost: dict | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> MIAReport:
    """Run the attacks on the ensemble of manifest ``m`` (and, with ``baseline``, on the approximate baseline).

    ``deleted``: the (X, y) rows that were deleted (the auditor keeps them; the workdir does not).
    ``heldout``: rows never trained on (default: the workdir's evaluation rows). ``population``: rows for
    the reference models, disjoint from the three groups (default: a random half of ``heldout``).
    ``retained``: members to contrast with (default: a sample of the live rows).
    """
    approx.refuse_encoder(m, "membership audit")
    t0 = time.time()
    rng = np.random.default_rng(seed)
    Xd, yd = np.asarray(deleted[0], np.float32), np.asarray(deleted[1]).astype(np.int64)
    Xh, yh = heldout if heldout is not None else heldout_rows(ctx)
    Xh, yh = np.asarray(Xh, np.float32), np.asarray(yh).astype(np.int64)
    if population is None and references > 0:
        perm = rng.permutation(len(yh))
        population, (Xh, yh) = _take(Xh, yh, perm[: len(perm) // 2]), _take(Xh, yh, perm[len(perm) // 2 :])
    Xl, yl = live_rows(ctx, m)
    if retained is None:
        n = min(len(yl), max(len(yd), len(yh), 200))
        retained = _take(Xl, yl, rng.choice(len(yl), n, replace=False))
    Xr, yr = np.asarray(retained[0], np.float32), np.asarray(retained[1]).astype(np.int64)
    groups = {"retained": (Xr, yr), "deleted": (Xd, yd), "heldout": (Xh, yh)}

    ref_conf = _reference_confidence(ctx, m, population, groups, references, seed) if references > 0 else None
    models = {EXACT: ctx.aggregator(m).predict_proba}
    rep = MIAReport(exact_cost=exact_cost or {})
    if baseline:
        Xp, yp = population if population is not None else (Xh, yh)
        res, before, after = approx.run_baseline(
            ctx, m, (np.concatenate([Xl, Xd]), np.concatenate([yl, yd])), (Xd, yd), (Xp, yp)
        )
        rep.baseline = res.to_dict()
        models[MONO] = lambda X, m=before: approx.proba(m, X)
        models[GA] = lambda X, m=after: approx.proba(m, X)
    for name, predict in models.items():
        _attack(rep, name, predict, groups, ref_conf, n_boot, seed)
    rep.settings = {
        "retained": len(yr),
        "deleted": len(yd),
        "heldout": len(yh),
        "references": references if ref_conf is not None else 0,
        "population": 0 if population is None else len(population[1]),
        "n_boot": n_boot,
        "seed": seed,
    }
    rep.seconds = time.time() - t0
    return rep


def _attack(rep: MIAReport, name: str, predict, groups: dict, ref_conf, n_boot: int, seed: int) -> None:
    """Score the groups with model ``name``'s probabilities; add its AUCs, ROC curves, KS tests, accuracy."""
    from scipy.stats import ks_2samp
    from sklearn.metrics import roc_curve

    probs = {g: predict(X) for g, (X, _) in groups.items()}
    losses = {g: row_loss(probs[g], groups[g][1]) for g in groups}
    scores = {"loss": {g: -v for g, v in losses.items()}}
    if ref_conf is not None:
        scores["reference"] = {
            g: (logit_conf(probs[g], groups[g][1]) - ref_conf[g][0]) / ref_conf[g][1] for g in groups
        }
    rep.accuracy[name] = float((probs["heldout"].argmax(1) == groups["heldout"][1]).mean())
    rep.mean_loss[name] = {g: float(v.mean()) for g, v in losses.items()}
    rep.ks[name] = {}
    for g in ("retained", "deleted") if name == EXACT else ("deleted",):
        ks = ks_2samp(losses[g], losses["heldout"])
        rep.ks[name][g] = {"statistic": float(ks.statistic), "pvalue": float(ks.pvalue)}
        for attack, sc in scores.items():
            pos, neg = sc[g], sc["heldout"]
            lo, hi, p = bootstrap_auc(pos, neg, n_boot, seed=seed)
            rep.results.append(AttackResult(name, attack, g, auc(pos, neg), lo, hi, p, len(pos), len(neg)))
            fpr, tpr, _ = roc_curve(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg])
            rep.curves[(name, attack, g)] = (fpr, tpr)


def _reference_confidence(ctx, m, population, groups, k: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per row, mean and spread of its logit confidence under K reference ensembles that never saw it.

    Each reference mimics the target: as many sub-models as it has active shards, each trained like one
    shard (``training.epochs`` epochs, same model and optimizer) on its own part of a random draw from the
    population, probabilities averaged. Returns group -> (mean, sd); the sd shrinks the per-row variance
    towards the global one (LiRA's advice for few reference models)."""
    Xp, yp = np.asarray(population[0], np.float32), np.asarray(population[1]).astype(np.int64)
    active = ctx.active_shards(m)
    live = sum(m.shards[s].rows for s in active)
    per = max(1, min(len(yp), live) // len(active))
    spec = approx.plain_spec(ctx.spec(m), ctx.config.training.epochs)
    rng = np.random.default_rng(seed + 1)
    conf = {g: [] for g in groups}
    for i in range(k):
        draw = rng.permutation(len(yp))
        parts = [draw[j * per : (j + 1) * per] for j in range(len(active))]
        models = [
            approx.train_plain(spec, Xp[p], yp[p], key=2_000_000 + i * 10_000 + j)[0] for j, p in enumerate(parts)
        ]
        for g, (X, y) in groups.items():
            conf[g].append(logit_conf(np.mean([approx.proba(m, X) for m in models], axis=0), y))
    c = {g: np.array(v) for g, v in conf.items()}
    global_var = np.concatenate([v.ravel() for v in c.values()]).var()
    return {g: (v.mean(0), np.sqrt((k * v.var(0) + global_var) / (k + 1))) for g, v in c.items()}


def roc_figure(rep: MIAReport):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = sorted({a for _, a, _ in rep.curves}, key=ATTACKS.index)
    fig, axes = plt.subplots(1, len(attacks), figsize=(5.2 * len(attacks), 4.6), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        for (model, a, group), (fpr, tpr) in rep.curves.items():
            if a != attack:
                continue
            r = rep.get(group, attack, model)
            style = "-" if model == EXACT else "--" if model == GA else ":"
            ax.plot(fpr, tpr, style, label=f"{model}: {group} (AUC {r.auc:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        ax.set(title=f"{attack} attack vs held-out rows", xlabel="false positive rate", ylabel="true positive rate")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def log_audit(ctx, m, mia: MIAReport | None = None, cert=None) -> str | None:
    """One MLflow "audit" run: pass/fail of the certificate audit, the MIA figures, the ROC plot and the
    report as JSON (counts and AUCs only: no raw rows, no ids). Returns the run id (None if tracking is off)."""
    from sisa.tracking.runs import MLflowObserver

    if not ctx.config.tracking.enabled:
        return None
    tags = {}
    metrics: dict = {}
    if cert is not None:
        tags = {"sisa.audit.scope": cert.scope, "sisa.audit.result": "pass" if cert.ok else "fail"}
        metrics.update(
            audit_pass=int(cert.ok),
            audit_failed_checks=len(cert.failures()),
            audit_shards_checked=len(cert.shards),
            audit_retrain_seconds=cert.retrain_seconds,
        )
    if mia is not None:
        metrics.update(mia.metrics(), mia_deleted_indistinguishable=int(mia.deleted_indistinguishable()))
    run = MLflowObserver(ctx)
    run.started("audit", m, tags)
    try:
        client = ctx.tracker().client
        if mia is not None:
            import matplotlib.pyplot as plt

            fig = roc_figure(mia)
            client.log_figure(run.run_id, fig, "audit/roc.png")
            plt.close(fig)
            client.log_dict(run.run_id, mia.to_dict(), "audit/mia.json")
        if cert is not None:
            client.log_dict(run.run_id, cert.to_dict(), "audit/certificate.json")
        run.finished("audit", m, [], metrics, tags, None)
    except BaseException as e:
        run.failed("audit", e)
        raise
    return run.run_id
