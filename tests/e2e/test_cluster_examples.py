"""The cluster examples in configs/cluster/ parse, are valid for the tools that read them, and agree with
each other: the Ray launcher YAML passes Ray's own schema, the KubeRay manifests wire the workdir volume,
config and MLflow together, the sisa config validates, and every `sisa` command they run is a real one."""

import copy
import re
import shlex

import pytest
import ray
import yaml
from helpers import REPO

from sisa import load_config
from sisa.cli.commands import main

HERE = REPO / "configs" / "cluster"
PY = "py311"


def docs(name) -> list[dict]:
    return [d for d in yaml.safe_load_all((HERE / name).read_text()) if d]


def by_kind(documents, kind) -> list[dict]:
    return [d for d in documents if d["kind"] == kind]


def sisa_commands(text: str) -> list[list[str]]:
    """Every `sisa <command> ...` invocation in a text (comments and strings), as argv lists."""
    out = []
    verbs = "train|delete|status|predict|repair|validate"
    for m in re.finditer(rf"\bsisa ((?:{verbs})\s[^\"\n&`]*--[^\"\n&`]*)", text):
        out.append(shlex.split(m.group(1).strip()))
    return out


def check_cli(argv: list[str]) -> None:
    """The command and every --option exist in sisa's CLI; a `train` names a config."""
    cmd = main.get_command(None, argv[0])
    assert cmd is not None, f"sisa has no command {argv[0]!r}"
    known = {o for p in cmd.params for o in p.opts}
    for a in argv[1:]:
        if a.startswith("--"):
            assert a.split("=")[0] in known, f"`sisa {argv[0]}` has no option {a}"
    if argv[0] in ("train", "delete", "status"):
        assert "--workdir" in argv


def test_sisa_cluster_config_validates_and_keeps_credentials_out():
    cfg = load_config(HERE / "sisa-s3.yaml")
    assert cfg.storage.uri.startswith("s3://") and cfg.data.source == "parquet" and cfg.data.path.startswith("s3://")
    assert cfg.cluster.executor == "ray" and cfg.cluster.address == "auto"
    assert cfg.tracking.uri.startswith("http://")
    assert cfg.resources.num_cpus == cfg.training.threads
    assert not {"key", "secret", "token"} & set(cfg.storage.options), "credentials come from the environment"


def test_ray_launcher_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((HERE / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # raises on any schema error
    assert raw["head_node_type"] in raw["available_node_types"]
    assert raw["docker"]["image"] == f"rayproject/ray:{ray.__version__}-{PY}-cpu"
    gpu = raw["available_node_types"]["gpu_worker"]["docker"]["worker_image"]
    assert gpu == f"rayproject/ray:{ray.__version__}-{PY}-gpu"
    assert "~/sisa" in raw["file_mounts"] and any("[s3]" in c for c in raw["setup_commands"])
    head = " ".join(raw["head_start_ray_commands"])
    assert "--num-cpus=0" in head and "mlflow server" in head
    assert any("/work" in o for o in raw["docker"]["head_run_options"]), "the workdir is on the host's volume"


def test_ray_launcher_runs_sisa_train_and_delete():
    text = (HERE / "ray-cluster.yaml").read_text()
    cmds = sisa_commands(text)
    assert {c[0] for c in cmds} >= {"train", "delete"}
    for argv in cmds:
        check_cli(argv)
    train = next(c for c in cmds if c[0] == "train")
    assert train[1] == "~/sisa/configs/cluster/sisa-s3.yaml" and (HERE / "sisa-s3.yaml").exists()
    delete = next(c for c in cmds if c[0] == "delete")
    assert delete[delete.index("--workdir") + 1] == train[train.index("--workdir") + 1]


def test_kuberay_manifests_wire_workdir_config_and_mlflow():
    base = docs("kuberay.yaml")
    (cluster,) = by_kind(base, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["spec"]["rayVersion"] == ray.__version__
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    claims = {d["metadata"]["name"] for d in by_kind(base, "PersistentVolumeClaim")}
    assert volumes["workdir"]["persistentVolumeClaim"]["claimName"] in claims
    assert by_kind(base, "PersistentVolumeClaim")[0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in cluster["spec"]["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        assert "volumes" not in spec, "workers read shards from S3, not from the head's volume"
        assert spec["containers"][0]["envFrom"] == head["containers"][0]["envFrom"], "same S3 credentials"
    gpu = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"

    # the config in the ConfigMap is sisa-s3.yaml with the in-cluster MLflow service
    (cm,) = by_kind(base, "ConfigMap")
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    in_cluster = load_config(yaml.safe_load(cm["data"]["sisa.yaml"]))
    shipped = load_config(HERE / "sisa-s3.yaml")
    assert in_cluster.model_dump(exclude={"tracking"}) == shipped.model_dump(exclude={"tracking"})
    (svc,) = by_kind(base, "Service")
    port = svc["spec"]["ports"][0]["port"]
    assert in_cluster.tracking.uri == f"http://{svc['metadata']['name']}:{port}"
    (mlflow,) = by_kind(base, "Deployment")
    assert "server" in mlflow["spec"]["template"]["spec"]["containers"][0]["command"]

    jobs = {d["metadata"]["name"]: d for f in ("kuberay-train-job.yaml", "kuberay-delete-job.yaml") for d in docs(f)}
    assert set(jobs) == {"sisa-train", "sisa-delete"}
    workdirs = set()
    for job in jobs.values():
        assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
        (argv,) = sisa_commands(job["spec"]["entrypoint"])
        check_cli(argv)
        workdir = argv[argv.index("--workdir") + 1]
        assert workdir.startswith(mounts["workdir"] + "/"), "the workdir is on the head's volume"
        workdirs.add(workdir)
        if argv[0] == "train":
            assert argv[1] == f"{mounts['config']}/sisa.yaml"
        else:
            assert argv[argv.index("--ids-file") + 1].startswith(mounts["workdir"] + "/")
    assert len(workdirs) == 1, "delete works on the workdir train wrote"


def test_dockerfile_matches_the_pinned_ray_and_python():
    text = (HERE / "Dockerfile").read_text()
    assert f"ARG BASE=rayproject/ray:{ray.__version__}-{PY}-cpu" in text
    assert 'pip install --no-cache-dir ".[s3]"' in text


@pytest.mark.parametrize("argv", [["train", "--workdir", "w", "--nope"], ["fly"]])
def test_the_command_check_itself_catches_mistakes(argv):
    with pytest.raises(AssertionError):
        check_cli(argv)
