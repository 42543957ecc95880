"""Configs: every shipped YAML validates; bad configs report all problems at once with hints."""

from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import REPO

from sisa import SisaEnsemble, load_config
from sisa.cli.commands import main
from sisa.errors import ConfigError

ROOT = REPO / "configs"
CONFIGS = sorted([*ROOT.rglob("*.yaml"), *ROOT.rglob("*.yml")])  # configs/cluster/ too


def documents(path: Path) -> list:
    import yaml

    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kind_of(documents: list) -> str:
    """What reads a shipped YAML file: Kubernetes (KubeRay manifests), the Ray cluster launcher, or sisa."""
    if all(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in documents):
        return "kubernetes"
    if len(documents) == 1 and isinstance(documents[0], dict) and "cluster_name" in documents[0]:
        return "ray-launcher"
    return "sisa"


SISA_CONFIGS = [p for p in CONFIGS if kind_of(documents(p)) == "sisa"]


def check_sisa(doc) -> None:
    cfg = load_config(doc)
    assert cfg.sharding.shards >= 1 and len(cfg.epochs_per_stage()) == cfg.sharding.slices


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_every_shipped_config_validates(path):
    """Each file is validated by what reads it: sisa configs by sisa (and the sisa configs embedded in a
    Kubernetes ConfigMap too), Ray launcher files by Ray's own schema, Kubernetes manifests for the fields
    every object needs (their wiring is checked in test_cluster_examples)."""
    import yaml

    docs = documents(path)
    assert docs, f"{path} is empty"
    kind = kind_of(docs)
    if kind == "kubernetes":
        for d in docs:
            assert d["metadata"]["name"], f"{path}: a {d['kind']} without metadata.name"
            if d["kind"] == "ConfigMap":
                embedded = [k for k in d["data"] if k.endswith((".yaml", ".yml"))]
                for k in embedded:
                    check_sisa(yaml.safe_load(d["data"][k]))
    elif kind == "ray-launcher":
        import copy

        from ray.autoscaler._private.util import prepare_config, validate_config

        validate_config(prepare_config(copy.deepcopy(docs[0])))  # raises on any schema error
    else:
        assert len(docs) == 1, f"{path}: a sisa config is one YAML document"
        check_sisa(path)


def test_every_kind_of_shipped_yaml_is_found():
    """The glob recurses: the cluster examples are among the files validated above, each as its kind."""
    kinds = {str(p.relative_to(ROOT)): kind_of(documents(p)) for p in CONFIGS}
    assert kinds["cluster/sisa-s3.yaml"] == "sisa"
    assert kinds["cluster/ray-cluster.yaml"] == "ray-launcher"
    assert kinds["cluster/kuberay.yaml"] == kinds["cluster/kuberay-train-job.yaml"] == "kubernetes"
    assert {"digits.yaml", "synthetic.yaml"} <= {k for k, v in kinds.items() if v == "sisa"}


def test_demo_and_synthetic_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"digits.yaml", "synthetic.yaml"} <= names
    assert load_config(Path("configs/synthetic.yaml")).data.synthetic.n_samples > 0


def test_all_problems_reported_at_once_with_hints():
    with pytest.raises(ConfigError, match="4 problem") as e:
        load_config({"sharding": {"shard": 3, "slices": 0}, "model": {"name": "mpl"}, "trainng": {}})
    text = "\n".join(e.value.problems)
    assert "did you mean 'shards'" in text
    assert "did you mean 'training'" in text
    assert "did you mean 'mlp'" in text
    assert "sharding.slices" in text


def test_schedule_and_weights_must_match_shape():
    with pytest.raises(ConfigError, match="one epoch count per slice"):
        load_config({"sharding": {"slices": 3}, "training": {"schedule": [1, 2]}})
    with pytest.raises(ConfigError, match="one per shard"):
        load_config({"sharding": {"shards": 2}, "aggregation": {"weights": [1.0]}})


def test_paper_schedule_keeps_total_work():
    cfg = load_config({"sharding": {"slices": 4}, "training": {"epochs": 10}})
    assert cfg.epochs_per_stage() == (4, 4, 4, 4)  # round(2*10/5)
    assert load_config({"training": {"schedule": [3, 2, 1, 1]}}).epochs_per_stage() == (3, 2, 1, 1)


def test_a_schedule_whose_last_stage_trains_nothing_is_refused():
    for sched in ([0, 0, 0], [3, 2, 0]):
        with pytest.raises(ConfigError, match="last stage of training.schedule has 0 epochs.*at least 1 epoch"):
            load_config({"sharding": {"slices": 3}, "training": {"schedule": sched}})
    # earlier stages may be skipped: the last one trains on every slice
    assert load_config({"sharding": {"slices": 3}, "training": {"schedule": [0, 0, 4]}}).epochs_per_stage() == (0, 0, 4)


def test_a_schedule_with_empty_early_stages_trains_and_deletes_exactly(tmp_path):
    import numpy as np
    from helpers import tiny_config, tiny_data, weights_equal

    X, y, ids = tiny_data(n=120)
    cfg = tiny_config(sharding={"shards": 2, "slices": 3}, training={"schedule": [0, 2, 3]})
    ens = SisaEnsemble.from_config(cfg, tmp_path / "w").fit(X, y, ids=ids)
    ens.delete([ids[5]])
    keep = ids != ids[5]
    ref = SisaEnsemble.from_config(cfg, tmp_path / "ref").fit(X[keep], y[keep], ids=ids[keep])
    assert weights_equal(ens, ref) and np.isfinite(ens.predict_proba(X[:3])).all()


def test_shipped_configs_keep_their_hashes():
    """Workdirs trained before data.num_classes existed must still open: unset, it leaves the hashes alone."""
    cfg = load_config(Path("configs/synthetic.yaml"))
    assert cfg.data.num_classes is None
    assert (cfg.training_hash(), cfg.config_hash()) == ("c30eec7f2cbbacb2", "8bbde48fc7f1565c")


def test_config_is_frozen():
    cfg = load_config({})
    with pytest.raises(Exception, match="frozen"):
        cfg.seed = 4


def test_validate_cli_reports_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sharding: {shards: 0}\nmodel: {name: cnnn}\nextra_key: 1\n")
    res = CliRunner().invoke(main, ["validate", str(bad), *map(str, SISA_CONFIGS[:1])])
    assert res.exit_code == 1
    assert "3 problem(s)" in res.output and "did you mean 'cnn'" in res.output
    assert f"{SISA_CONFIGS[0]}: ok" in res.output


def test_config_paths_must_stay_inside_workdir(tmp_path):
    cfg = {"data": {"source": "csv", "path": "../../etc/passwd"}, "tracking": {"enabled": False}}
    with pytest.raises(ConfigError, match="outside the workdir"):
        SisaEnsemble.from_config(cfg, tmp_path / "w").fit()
    with pytest.raises(ConfigError, match="outside the workdir"):
        SisaEnsemble.from_config({"storage": {"uri": "/tmp/elsewhere"}}, tmp_path / "w").storage()


def test_credentials_are_redacted_when_logged():
    from sisa.config import dump_yaml

    cfg = load_config(
        {
            "storage": {
                "uri": "s3://b/p",
                "options": {
                    "key": "AKIA1",
                    "secret": "S3CR3T",
                    "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
                },
            }
        }
    )
    logged = dump_yaml(cfg, redact=True)
    assert "S3CR3T" not in logged and "AKIA1" not in logged and "127.0.0.1:9" in logged
    assert "S3CR3T" in dump_yaml(cfg), "the workdir's own copy keeps them (it is needed to reopen)"
