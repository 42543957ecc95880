"""Run by test_cluster_faults in its own process: a head and two worker nodes on one machine
(ray.cluster_utils.Cluster); a worker node is killed while shards train, and again while a deletion
retrains. Prints JSON: whether the results equal a fault-free in-process run."""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import ray
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).parent))
from helpers import tiny_config, tiny_data, weights_equal  # noqa: E402

from sisa import SisaEnsemble  # noqa: E402


def main():
    tmp = Path(tempfile.mkdtemp())
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
    ray.init(address=cluster.address)
    cfg = tiny_config(
        sharding={"shards": 4, "slices": 3}, training={"epochs": 12}, cluster={"executor": "ray", "max_retries": 5}
    )
    X, y, ids = tiny_data(n=600)
    out = {}
    stages = []

    def kill_after(n):
        def cb(plan, entry, metrics):
            stages.append((plan.shard, metrics["stage"]))
            if len(stages) == n and nodes:
                cluster.remove_node(nodes.pop())  # SIGKILLs that node's raylet and its workers

        return cb

    ens = SisaEnsemble.from_config(cfg, tmp / "ray")
    ens.fit(X, y, ids=ids, progress=kill_after(2))
    out["fit_nodes_lost"] = 2 - len(nodes)
    out["fit_workers_lost"] = ens._ctx.executor.lost_workers
    ref = SisaEnsemble.from_config(cfg, tmp / "ref", executor="inprocess").fit(X, y, ids=ids)
    out["fit_equal"] = weights_equal(ens, ref)
    out["joined_address"] = ray.get_runtime_context().gcs_address == cluster.address

    nodes.append(cluster.add_node(num_cpus=1))
    gone = [i for i in ids.tolist() if ens.shard_of(i)[1] == 0][:4]  # first slices: long retrains
    stages.clear()
    ens.delete(gone, progress=kill_after(1))
    out["delete_nodes_lost"] = 2 - len(nodes)
    out["delete_workers_lost"] = ens._ctx.executor.lost_workers - out["fit_workers_lost"]
    keep = ~np.isin(ids, gone)
    ref2 = SisaEnsemble.from_config(cfg, tmp / "ref2", executor="inprocess").fit(X[keep], y[keep], ids=ids[keep])
    out["delete_equal"] = weights_equal(ens, ref2)
    ray.shutdown()
    cluster.shutdown()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
