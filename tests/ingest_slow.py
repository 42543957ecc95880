"""A Ray worker setup hook for ingest_faults.py: every row-group unit of the cluster ingest logs itself and
takes a little longer, so that a node can be killed while units are still running."""

import os
import time


def setup():
    import orchestration.ingest as ingest

    place = ingest._place_unit

    def slow(batch, job):
        import ray

        with open(os.environ["SISA_INGEST_LOG"], "a") as f:
            f.write(f"{batch['group'][0]}@{ray.get_runtime_context().get_node_id()}\n")
        time.sleep(0.4)
        return place(batch, job)

    ingest._place_unit = slow
