"""The deletion ledger: a sqlite file in the workdir (WAL mode), written with synchronous commits.

A request is committed (state "pending") before any work starts and moves pending -> retraining ->
effective -> done (`RequestState`, `TRANSITIONS`); a deletion skips retraining (pending -> effective: its
manifest's ``retraining`` entry says which request retrains, one fsynced commit fewer on its way); `Ledger.set_state` refuses any other move. A deletion is
*effective* once the retrained models serve and the store holds no byte of its rows; it is *done* once its
owed bookkeeping (evaluation, MLflow run, MLflow publish and the purge of every superseded model version)
is finished too. Additions and compactions go straight from retraining to done. A recovery after a crash
runs the request again, so retraining -> retraining is a legal move; nothing leaves done.
Ids are stored only as keyed hashes (HMAC-SHA256 with the workdir's secret). secure_delete is on, so
sqlite zeroes freed pages; the ledger never holds raw ids in the first place.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path

from shards.errors import WorkdirError


class RequestState(StrEnum):
    """Where a deletion request stands. A `str`: ``state == "done"`` and JSON both see the plain value."""

    PENDING = "pending"  # recorded (ids hashed, plan fixed); a deletion's shards may be excluded (manifest)
    RETRAINING = "retraining"  # its shards are excluded and retrain (again, after a crash)
    EFFECTIVE = "effective"  # new models serve, store purged; evaluation and MLflow work still owed
    DONE = "done"  # swapped, purged and its receipt stored: final


# the legal moves of `Ledger.set_state`: from a state to the states it may go to
TRANSITIONS: dict[RequestState, frozenset[RequestState]] = {
    RequestState.PENDING: frozenset({RequestState.RETRAINING, RequestState.EFFECTIVE}),
    RequestState.RETRAINING: frozenset({RequestState.RETRAINING, RequestState.EFFECTIVE, RequestState.DONE}),
    RequestState.EFFECTIVE: frozenset({RequestState.DONE}),
    RequestState.DONE: frozenset(),
}


_SCHEMA_READY: set[str] = set()  # ledger files whose tables this process has made sure of


class Ledger:
    def __init__(self, path: Path):
        self.path = Path(path)
        if str(self.path) in _SCHEMA_READY and self.path.exists():
            return  # created by this process already: no connection spent on the schema per use
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS requests (id TEXT PRIMARY KEY, created REAL, state TEXT, "
                "plan TEXT, receipt TEXT, updated REAL)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS request_ids (request TEXT, hashed_id TEXT, PRIMARY KEY (request, hashed_id))"
            )
            db.execute("CREATE INDEX IF NOT EXISTS by_hash ON request_ids (hashed_id)")
            db.execute(  # ids whose owners consented again after a deletion (`add(readmit=...)`, a refit's)
                "CREATE TABLE IF NOT EXISTS readmissions (hashed_id TEXT, time REAL, request TEXT, "
                "PRIMARY KEY (hashed_id, request))"
            )
        _SCHEMA_READY.add(str(self.path))

    def _connect(self):
        return _connection(self.path)

    def record(self, hashed_ids: list[str], plan: dict, readmitted: list[str] = ()) -> str:
        """Durably record a new request (state pending) and return its id. ``hashed_ids`` are the ids it
        deletes (an addition, ``plan["kind"] == "add"``, deletes none); ``readmitted`` the hashed ids it
        readmits, recorded in the same transaction."""
        rid = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT INTO requests VALUES (?, ?, ?, ?, NULL, ?)",
                (rid, now, RequestState.PENDING.value, json.dumps(plan), now),
            )
            db.executemany("INSERT INTO request_ids VALUES (?, ?)", [(rid, h) for h in hashed_ids])
            db.executemany("INSERT INTO readmissions VALUES (?, ?, ?)", [(h, now, rid) for h in readmitted])
            db.execute("COMMIT")
        return rid

    def readmit(self, hashed_ids: list[str], request: str) -> None:
        """Record that these (hashed) deleted ids may be trained on again, by ``request`` (e.g. a refit)."""
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT OR REPLACE INTO readmissions VALUES (?, ?, ?)", [(h, now, request) for h in hashed_ids]
            )
            db.execute("COMMIT")

    def erased(self, hashed_ids: list[str]) -> set[str]:
        """Which of these hashed ids are erased now: deleted by a request, and not readmitted after the
        latest deletion that named them."""
        out: set[str] = set()
        with self._connect() as db:
            for i in range(0, len(hashed_ids), 500):
                chunk = hashed_ids[i : i + 500]
                q = (
                    "SELECT r.hashed_id FROM request_ids r JOIN requests q ON q.id = r.request "
                    f"WHERE r.hashed_id IN ({','.join('?' * len(chunk))}) GROUP BY r.hashed_id "
                    "HAVING MAX(q.created) >= COALESCE((SELECT MAX(a.time) FROM readmissions a "
                    "WHERE a.hashed_id = r.hashed_id), -1)"
                )
                out.update(r[0] for r in db.execute(q, chunk))
        return out

    def readmissions(self) -> dict[str, float]:
        """{hashed id: time of its latest readmission}."""
        with self._connect() as db:
            return dict(db.execute("SELECT hashed_id, MAX(time) FROM readmissions GROUP BY hashed_id").fetchall())

    def set_state(self, rid: str, state: RequestState | str, receipt: dict | None = None) -> None:
        """Move request ``rid`` to ``state`` (storing ``receipt`` with it when given), in one transaction that
        first checks the move against `TRANSITIONS`. Raises `WorkdirError` for an unknown request, an unknown
        state or an illegal move (e.g. out of done, or back to pending)."""
        try:
            to = RequestState(state)
        except ValueError:
            raise WorkdirError(
                f"unknown deletion request state {state!r}; the states are {', '.join(RequestState)}",
                request_id=rid,
                path=str(self.path),
            ) from None
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")  # the check and the move are one step, even across processes
            try:
                row = db.execute("SELECT state FROM requests WHERE id=?", (rid,)).fetchone()
                if row is None:
                    raise WorkdirError(f"the ledger {self.path} holds no deletion request {rid!r}", request_id=rid)
                now = RequestState(row[0])
                if to not in TRANSITIONS[now]:
                    allowed = " or ".join(s for s in RequestState if s in TRANSITIONS[now]) or "nothing (it is final)"
                    raise WorkdirError(
                        f"deletion request {rid} cannot move from {now} to {to}: from {now} it may move to {allowed}",
                        request_id=rid,
                        state=now.value,
                        to=to.value,
                        path=str(self.path),
                    )
                if receipt is None:
                    db.execute("UPDATE requests SET state=?, updated=? WHERE id=?", (to.value, time.time(), rid))
                else:
                    db.execute(
                        "UPDATE requests SET state=?, updated=?, receipt=? WHERE id=?",
                        (to.value, time.time(), json.dumps(receipt), rid),
                    )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def state(self, rid: str) -> RequestState | None:
        """The state of request ``rid`` (None if the ledger never recorded it)."""
        with self._connect() as db:
            row = db.execute("SELECT state FROM requests WHERE id=?", (rid,)).fetchone()
        return RequestState(row[0]) if row else None

    def unfinished(self) -> list[dict]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT id, state, plan FROM requests WHERE state != ? ORDER BY created", (RequestState.DONE.value,)
            ).fetchall()
        return [{"id": r[0], "state": RequestState(r[1]), "plan": json.loads(r[2])} for r in rows]

    def hashed_ids(self, rid: str) -> list[str]:
        with self._connect() as db:
            return [r[0] for r in db.execute("SELECT hashed_id FROM request_ids WHERE request=?", (rid,))]

    def deleted(self, hashed_ids: list[str]) -> set[str]:
        """Which of these hashed ids belong to a request already recorded (in any state)."""
        out: set[str] = set()
        with self._connect() as db:
            for i in range(0, len(hashed_ids), 500):
                chunk = hashed_ids[i : i + 500]
                q = f"SELECT hashed_id FROM request_ids WHERE hashed_id IN ({','.join('?' * len(chunk))})"
                out.update(r[0] for r in db.execute(q, chunk))
        return out

    def deletions(self, hashed_ids: list[str]) -> dict[str, tuple[str, float]]:
        """{hashed id: (request id, created)} of the latest recorded request (any state) naming each of these
        hashed ids; ids no request names are left out. Answers only for the hashes asked about."""
        out: dict[str, tuple[str, float]] = {}
        with self._connect() as db:
            for i in range(0, len(hashed_ids), 500):
                chunk = hashed_ids[i : i + 500]
                q = (
                    "SELECT r.hashed_id, q.id, q.created FROM request_ids r JOIN requests q ON q.id = r.request "
                    f"WHERE r.hashed_id IN ({','.join('?' * len(chunk))}) ORDER BY q.created"
                )
                out.update((h, (rid, created)) for h, rid, created in db.execute(q, chunk))  # the latest wins
        return out

    def requests(self) -> list[dict]:
        with self._connect() as db:
            rows = db.execute("SELECT id, created, state, receipt FROM requests ORDER BY created").fetchall()
        return [
            {"id": r[0], "created": r[1], "state": RequestState(r[2]), "receipt": json.loads(r[3]) if r[3] else None}
            for r in rows
        ]

    def receipt(self, rid: str) -> dict | None:
        with self._connect() as db:
            row = db.execute("SELECT receipt FROM requests WHERE id=?", (rid,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None


# One connection per ledger file and process, kept open: in WAL mode a commit is one fsync of the log, but
# the last connection to close folds the log back into the file (more fsyncs), which a connection per call
# would pay on every commit. Keyed by path; reopened when the file is another one (removed, recreated) or
# in a forked child (an inherited connection is never used, nor closed, there).
_OPEN: dict[str, tuple[int, int, sqlite3.Connection, threading.RLock]] = {}
_ABANDONED: list = []  # connections of a parent process: kept referenced so that the child never closes them
_GUARD = threading.Lock()


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


@contextmanager
def _connection(path: Path):
    """The process's connection to the ledger at ``path``, held alone for the block; a transaction the block
    left open is rolled back."""
    key, pid = str(path), os.getpid()
    with _GUARD:
        entry = _OPEN.get(key)
        ino = _inode(path)
        if entry is None or entry[0] != pid or ino is None or entry[1] != ino:
            if entry is not None and entry[0] != pid:
                _ABANDONED.append(entry[2])
            db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")  # synchronous=FULL: each commit is durable when it returns
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA secure_delete=ON")
            entry = _OPEN[key] = (pid, _inode(path), db, threading.RLock())
    db, lock = entry[2], entry[3]
    with lock:
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
