"""GPUs: resources.num_gpus per shard reaches Ray (actor resources) and Lightning (accelerator "gpu",
devices=1); fractional values let shards share a GPU; exactness holds on the same device type.

The tests that train on a GPU skip on CPU-only machines. The placement test runs everywhere: it starts a
Ray that declares one GPU (Ray schedules on declared resources) and checks that two shard workers with
num_gpus 0.5 are placed on it together, through sisa's own executor and worker pool.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import REPO, tiny_config, tiny_data, weights_equal

from sisa import SisaEnsemble
from sisa.errors import ConfigError
from sisa.manifest import Manifest

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU visible (torch.cuda.is_available() is False)"
)

# the data schema a spec is built for: 6 features, 3 classes
SCHEMA = Manifest(config_hash="", training_hash="", id_kind="str", input_shape=[6], num_classes=3, storage="")


def test_num_gpus_sets_the_accelerator_and_the_actor_resources(tmp_path):
    cfg = tiny_config(resources={"num_cpus": 1, "num_gpus": 0.25})
    ens = SisaEnsemble.from_config(cfg, tmp_path / "w", executor="ray")
    spec = ens._ctx.spec(SCHEMA)
    assert spec.accelerator == "gpu"
    assert (ens._ctx.executor.num_cpus, ens._ctx.executor.num_gpus) == (1, 0.25)
    cpu = SisaEnsemble.from_config(tiny_config(), tmp_path / "c")
    assert cpu._ctx.spec(SCHEMA).accelerator == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_inprocess_gpu_config_without_a_gpu_fails_before_writing(tmp_path):
    X, y, ids = tiny_data()
    wd = tmp_path / "w"
    with pytest.raises(ConfigError, match="num_gpus is 1.0 but this process sees no CUDA GPU"):
        SisaEnsemble.from_config(tiny_config(resources={"num_gpus": 1}), wd).fit(X, y, ids=ids)
    assert not (wd / "manifest.json").exists() and not (wd / "store").exists()


PLACEMENT = textwrap.dedent(
    """
    import json, os, sys
    import ray
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, namespace="gpu-placement")
    from orchestration import pool
    from orchestration.cluster import capacity
    from orchestration.ray_executor import ShardWorker
    from sisa import SisaEnsemble

    class Probe(ShardWorker):
        def where(self):
            return [str(g) for g in ray.get_gpu_ids()], os.environ.get("CUDA_VISIBLE_DEVICES")

    cfg = {"resources": {"num_cpus": 0.5, "num_gpus": 0.5}, "cluster": {"executor": "ray"}, "tracking": {"enabled": False}}
    ens = SisaEnsemble.from_config(cfg, sys.argv[1])
    ex = ens._ctx.executor
    key = ex._key()
    limit = capacity(ex.num_cpus, ex.num_gpus)
    actors = pool.borrow(key, 3, limit, Probe)
    out = {"limit": limit, "placed": len(actors), "where": ray.get([a.where.remote() for a in actors])}
    out["free_gpu"] = ray.available_resources().get("GPU", 0.0)
    print("RESULT " + json.dumps(out), flush=True)
    pool.shutdown_all()
    ray.shutdown()
    """
)


def test_fractional_gpus_put_two_shard_workers_on_one_gpu(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", PLACEMENT, str(tmp_path / "w")], env=env, capture_output=True, text=True, timeout=240
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    out = json.loads(line[7:])
    assert out["limit"] == 2, "one GPU at 0.5 per shard holds two shard workers"
    assert out["placed"] == 2
    (gpus_a, cvd_a), (gpus_b, cvd_b) = out["where"]
    assert gpus_a == gpus_b and len(gpus_a) == 1, "both workers were given the same GPU"
    assert cvd_a == cvd_b and cvd_a, "Ray sets CUDA_VISIBLE_DEVICES, so devices=1 in Lightning means that GPU"
    assert out["free_gpu"] == 0.0


def gpu_cfg(**over):
    return tiny_config(resources={"num_cpus": 1, "num_gpus": 0.5}, **over)


@needs_gpu
def test_gpu_fit_is_deterministic_and_deletion_exact(tmp_path):
    X, y, ids = tiny_data(n=300)
    a = SisaEnsemble.from_config(gpu_cfg(), tmp_path / "a").fit(X, y, ids=ids)
    b = SisaEnsemble.from_config(gpu_cfg(), tmp_path / "b").fit(X, y, ids=ids)
    assert weights_equal(a, b), "two GPU fits give the same weights"
    gone = [ids[3], ids[150]]
    a.delete(gone)
    keep = ~np.isin(ids, gone)
    ref = SisaEnsemble.from_config(gpu_cfg(), tmp_path / "ref").fit(X[keep], y[keep], ids=ids[keep])
    assert weights_equal(a, ref), "fit(D).delete(S) == fit(D \\ S) on the GPU"


@needs_gpu
def test_shards_share_a_gpu_on_ray_with_the_same_weights(tmp_path, ray_session):
    import ray

    from orchestration import pool

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the test Ray session has no GPU resource")
    X, y, ids = tiny_data(n=300)
    cfg = gpu_cfg(sharding={"shards": 4, "slices": 3}, cluster={"executor": "ray"})
    on_ray = SisaEnsemble.from_config(cfg, tmp_path / "ray").fit(X, y, ids=ids)
    local = SisaEnsemble.from_config(gpu_cfg(sharding={"shards": 4, "slices": 3}), tmp_path / "local").fit(
        X, y, ids=ids
    )
    assert weights_equal(on_ray, local), "the same device type gives the same weights on Ray and in process"
    key = on_ray._ctx.executor._key()
    where = ray.get(
        [a.__ray_call__.remote(lambda self: [str(g) for g in ray.get_gpu_ids()]) for a in pool.all_free(key)]
    )
    assert len(where) >= 2 and all(len(w) == 1 for w in where)
    assert len({w[0] for w in where}) < len(where), "several shard workers share one GPU"
