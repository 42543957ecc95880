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
