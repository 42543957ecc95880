"""No raw row outlives the operation that read it into a worker's row cache (`shards.rowcache`): after a
fit, and after a deletion made by another handle, no cache file on this machine holds a training row, on
either executor. A cache kept between operations would be out of reach of a deletion in another process."""

from pathlib import Path

import numpy as np
import pytest
from helpers import scan, tiny_config, tiny_data

from shards.rowcache import cache_root
from sisa import SisaEnsemble


@pytest.mark.parametrize("executor", ["inprocess", "ray"])
def test_no_row_is_left_in_a_row_cache_after_an_operation(tmp_path, executor, request):
    if executor == "ray":
        request.getfixturevalue("ray_session")
    X, y, ids = tiny_data(n=240)
    marked = [5, 77, 160]
    for k, r in enumerate(marked):  # rows whose bytes no other test writes
        X[r] = np.float32(90817.5 + 3 * k + (executor == "ray")) + np.arange(X.shape[1], dtype=np.float32)
    needles = [X[r].tobytes() for r in marked]
    cfg = tiny_config(cluster={"executor": executor})
    a = SisaEnsemble.from_config(cfg, tmp_path / "w").fit(X, y, ids=ids)
    root = cache_root()
    assert scan_root(root, needles) == [], "the fit's cache is emptied when its run ends"
    SisaEnsemble.open(tmp_path / "w").delete([ids[marked[0]]])  # another handle deletes
    assert scan_root(root, needles) == []
    a.delete([ids[marked[1]]])  # the first handle still works, reading its rows afresh
    assert scan_root(root, needles) == []


def scan_root(root, needles):
    return scan(Path(root), needles)


def test_no_warm_worker_holds_a_row_or_a_model_between_operations(tmp_path, ray_session):
    """Each worker finishes its run in its last stage call (or in the run's end, `_sync`): between runs
    none holds a cached row or the state of a model, without a separate round trip after a deletion
    (`RayExecutor.drop_caches` sends none)."""
    from orchestration import pool

    X, y, ids = tiny_data(n=240)
    cfg = tiny_config(cluster={"executor": "ray", "max_workers": 2}, sharding={"shards": 5, "slices": 3})
    ens = SisaEnsemble.from_config(cfg, tmp_path / "w").fit(X, y, ids=ids)
    key = ens._ctx.executor._key()

    def held():
        return ray_session.get([a.__ray_call__.remote(lambda self: self.runner.held()) for a in pool.all_free(key)])

    nothing = {"cache_files": 0, "cached_rows": 0, "state": False}
    after_fit = held()
    assert after_fit and all(h == nothing for h in after_fit), after_fit
    ens.delete([ids[3], ids[100]])
    after_delete = held()
    assert after_delete and all(h == nothing for h in after_delete), after_delete
