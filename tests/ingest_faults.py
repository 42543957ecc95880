"""Run by test_cluster_faults in its own process: a head and two worker nodes on one machine
(ray.cluster_utils.Cluster); a worker node is killed while the Ray Data ingest runs, just as a unit starts
on it (units are slowed by the worker hook in ingest_slow.py). Prints JSON: whether the slice files,
held-out rows and records equal those of the single-process ingest, and how many unit runs there were
(more than units: Ray re-ran some)."""

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from helpers import tiny_data  # noqa: E402

from orchestration.ingest import ray_ingest  # noqa: E402
from shards.ingest import ingest_parquet  # noqa: E402
from shards.storage import Storage  # noqa: E402


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def main():
    tmp = Path(tempfile.mkdtemp())
    log = tmp / "units.log"
    log.touch()
    X, y, ids = tiny_data(n=480)
    t = pa.table({"id": ids, **{f"f{k}": X[:, k] for k in range(X.shape[1])}, "label": y})
    (tmp / "in").mkdir()
    for k in range(2):
        pq.write_table(t.slice(240 * k, 240), tmp / "in" / f"part-{k}.parquet", row_group_size=20)
    units = 24

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {"PYTHONPATH": path, "SISA_INGEST_LOG": str(log)}
    ray.init(address=cluster.address, runtime_env={"env_vars": env, "worker_process_setup_hook": "ingest_slow.setup"})
    out = {}
    kw = dict(seed=7, shards=3, slices=2, test_fraction=0.2)
    result = {}

    def ingest():  # Ray calls work from any thread; Cluster.add_node needs the main one
        try:
            result["got"] = ray_ingest(str(tmp / "in"), Storage(str(tmp / "a")), eval_path=str(tmp / "a.npy"), **kw)
        except BaseException as e:
            result["error"] = f"{type(e).__name__}: {e}"

    run = threading.Thread(target=ingest, daemon=True)
    run.start()
    victim = nodes[-1].node_id
    while run.is_alive():  # a few units in, and one just started on the node to kill: it dies in flight
        runs = log.read_text().split()
        if len(runs) >= 4 and runs[-1].endswith(victim):
            break
        time.sleep(0.02)
    out["killed_at_run"] = len(log.read_text().split())
    out["killed_node"] = nodes[-1].node_id
    cluster.remove_node(nodes.pop())  # SIGKILLs that node's raylet and its workers
    nodes.append(cluster.add_node(num_cpus=1))
    run.join(timeout=300)
    if "error" in result:
        print("RESULT " + json.dumps({"error": result["error"]}))
        return
    got = result["got"]
    ref = ingest_parquet(str(tmp / "in"), Storage(str(tmp / "b")), eval_path=str(tmp / "b.npy"), **kw)
    runs = log.read_text().split()
    out["runs"], out["units"] = len(runs), units
    out["runs_on_killed_node"] = sum(r.endswith(out["killed_node"]) for r in runs)
    out["records_equal"] = got == ref
    out["files_equal"] = snapshot(tmp / "a") == snapshot(tmp / "b")
    out["eval_equal"] = (tmp / "a.npy").read_bytes() == (tmp / "b.npy").read_bytes()
    ray.shutdown()
    cluster.shutdown()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
