"""The deletion ledger's request states: an Enum that still compares and serialises as its string, and
`set_state` moving a request only along pending -> retraining (-> retraining on recovery) -> done."""

import json
import pickle

import pytest

from sisa.errors import WorkdirError
from sisa.ledger import TRANSITIONS, Ledger, RequestState


@pytest.fixture
def ledger(tmp_path):
    return Ledger(tmp_path / "ledger.db")


def test_states_are_their_strings():
    assert RequestState.DONE == "done" and "retraining" == RequestState.RETRAINING
    assert f"{RequestState.PENDING}" == "pending" and str(RequestState.DONE) == "done"
    assert json.dumps({"state": RequestState.DONE}) == '{"state": "done"}'
    assert RequestState("retraining") is RequestState.RETRAINING


def test_a_request_moves_pending_retraining_done(ledger):
    rid = ledger.record(["h1", "h2"], {"slices": [[0, 1]]})
    assert ledger.state(rid) is RequestState.PENDING
    assert ledger.unfinished()[0]["state"] is RequestState.PENDING
    ledger.set_state(rid, RequestState.RETRAINING)
    ledger.set_state(rid, RequestState.RETRAINING)  # a recovery re-runs the request
    assert ledger.state(rid) is RequestState.RETRAINING
    ledger.set_state(rid, "done", {"request_id": rid, "rows_deleted": 2})
    (req,) = ledger.requests()
    assert req["state"] is RequestState.DONE and req["state"] == "done"
    assert req["receipt"] == {"request_id": rid, "rows_deleted": 2}
    assert ledger.unfinished() == []


@pytest.mark.parametrize(
    "path, to, match",
    [
        (
            [],
            RequestState.DONE,
            "cannot move from pending to done: from pending it may move to retraining or effective",
        ),
        ([], RequestState.PENDING, "cannot move from pending to pending"),
        ([RequestState.RETRAINING], RequestState.PENDING, "cannot move from retraining to pending"),
        ([RequestState.RETRAINING, RequestState.DONE], RequestState.DONE, r"it may move to nothing \(it is final\)"),
        ([RequestState.RETRAINING, RequestState.DONE], RequestState.RETRAINING, "cannot move from done to retraining"),
    ],
)
def test_illegal_moves_are_refused_and_change_nothing(ledger, path, to, match):
    rid = ledger.record(["h"], {"slices": []})
    for state in path:
        ledger.set_state(rid, state)
    before = ledger.requests()
    with pytest.raises(WorkdirError, match=match) as info:
        ledger.set_state(rid, to, {"request_id": rid})
    assert info.value.request_id == rid and info.value.to == to.value
    assert ledger.requests() == before, "a refused move leaves the request (and its receipt) as it was"
    assert pickle.loads(pickle.dumps(info.value)).state == info.value.state


def test_unknown_request_or_state_is_refused(ledger):
    with pytest.raises(WorkdirError, match="holds no deletion request 'nope'"):
        ledger.set_state("nope", RequestState.RETRAINING)
    rid = ledger.record(["h"], {"slices": []})
    with pytest.raises(WorkdirError, match="unknown deletion request state 'finished'; the states are pending, "):
        ledger.set_state(rid, "finished")
    assert ledger.state(rid) is RequestState.PENDING and ledger.state("nope") is None


def test_transitions_cover_every_state_and_done_is_final():
    assert set(TRANSITIONS) == set(RequestState)
    assert TRANSITIONS[RequestState.DONE] == frozenset()
    assert RequestState.PENDING not in set().union(*TRANSITIONS.values()), "nothing moves back to pending"


def test_the_kept_connection_survives_a_refused_move_a_recreated_file_and_another_process(tmp_path):
    import sqlite3
    import subprocess
    import sys

    path = tmp_path / "ledger.db"
    led = Ledger(path)
    rid = led.record(["h1"], {"slices": [[0, 0]]})
    with pytest.raises(WorkdirError, match="cannot move from pending to done"):
        led.set_state(rid, RequestState.DONE)
    led.set_state(rid, RequestState.EFFECTIVE)  # the refused move's transaction was rolled back
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # another process sees every commit at once, and its own commits are seen here
    code = (
        "import sys; from sisa.ledger import Ledger; led = Ledger(sys.argv[1]);"
        "print(led.state(sys.argv[2])); led.set_state(sys.argv[2], 'done')"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path), rid], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["effective"] and Ledger(path).state(rid) is RequestState.DONE
    # the file removed and written again: a new connection, not the one to the unlinked file
    for p in tmp_path.glob("ledger.db*"):
        p.unlink()
    again = Ledger(path)
    assert again.requests() == [] and again.state(again.record(["h2"], {"slices": []})) is RequestState.PENDING
    assert [r["state"] for r in Ledger(path).requests()] == ["pending"]
