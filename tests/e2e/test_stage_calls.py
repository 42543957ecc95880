"""On Ray a shard's retraining is one call to its worker however many stages it runs (a streaming
generator, `orchestration.ray_executor`): no round trip between stages, each stage still reported as it
is written."""

from helpers import tiny_config, tiny_data

from orchestration import pool
from shards.store import read_slice
from sisa import SisaEnsemble


class _Counting:
    """A worker handle that counts the calls the executor makes to ``run``."""

    def __init__(self, actor, calls: list):
        self._actor, self._calls = actor, calls

    def __getattr__(self, name):
        if name == "run":
            self._calls.append(name)
        return getattr(self._actor, name)


def test_a_shard_retrained_from_its_first_stage_is_one_call(tmp_path, ray_session, monkeypatch):
    X, y, ids = tiny_data(n=240)
    ens = SisaEnsemble.from_config(tiny_config(cluster={"executor": "ray"}), tmp_path / "w").fit(X, y, ids=ids)
    calls: list = []
    borrow, give_back = pool.borrow, pool.give_back
    monkeypatch.setattr(pool, "borrow", lambda *a, **k: [_Counting(w, calls) for w in borrow(*a, **k)])
    monkeypatch.setattr(pool, "give_back", lambda key, ws: give_back(key, [getattr(w, "_actor", w) for w in ws]))
    first = read_slice(ens.storage(), ens.manifest.shards[1].slices[0].to_dict())["id"][0]
    stages = []
    receipt = ens.delete([first], progress=lambda plan, entry, metrics: stages.append(entry["stage"]))
    assert stages == [1, 2, 3] and list(receipt.shards) == [1], "stages 1-3 of shard 1, each reported"
    assert calls == ["run"], f"one call for the shard's three stages, not {len(calls)}"
