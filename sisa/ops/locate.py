"""Where ids are: training rows (by shard and slice), held-out evaluation rows, base rows (non-erasable,
`sisa.ops.base`), already deleted, unknown."""

from __future__ import annotations

from dataclasses import dataclass

from shards.errors import DataError, UnknownIdsError
from shards.partition import candidates
from shards.store import read_slice
from sisa import evalfile
from sisa.manifest import Manifest


def locate(ctx, m: Manifest, ids: list) -> tuple[dict, set, list, list]:
    """Split canonical ids into training rows found {(shard, slice): set(ids)}, evaluation rows, already
    deleted (the ledger knows their hashes), and unknown."""
    c, store = ctx.config, ctx.storage()
    by_slice: dict[tuple[int, int], list] = {}
    later: dict = {}  # the second place an id can be in, under a deletion-aware placement (its prior unknown)
    for i in ids:
        places = candidates(i, c.seed, c.sharding.shards, c.sharding.slices, c.placement())
        by_slice.setdefault(places[0], []).append(i)
        if len(places) > 1:
            later[i] = places[1]
    found: dict[tuple[int, int], set] = {}
    missing = []
    appended: dict[tuple[int, int], set] = {}  # slices after the config's R (sharding.new_rows: append)
    for (s, j), group in by_slice.items():
        present = set(read_slice(store, m.shards[s].slices[j].to_dict())["id"].tolist())
        hit = {i for i in group if i in present}
        if hit:
            found[(s, j)] = hit
        rest = [i for i in group if i not in present]
        missing += [i for i in rest if i in later]
        rest = [i for i in rest if i not in later]
        for k in range(c.sharding.slices, len(m.shards[s].slices)):
            if not rest:
                break
            if (s, k) not in appended:
                appended[(s, k)] = set(read_slice(store, m.shards[s].slices[k].to_dict())["id"].tolist())
            hit = {i for i in rest if i in appended[(s, k)]}
            if hit:
                found.setdefault((s, k), set()).update(hit)
                rest = [i for i in rest if i not in hit]
        missing += rest
    missing = _second_places(store, m, later, missing, found)
    held = evalfile.find(ctx.workdir.path, missing)
    missing = [i for i in missing if i not in held]
    gone = set()
    if missing:
        hashes = ctx.workdir.hash_ids(missing)
        known = ctx.ledger().deleted(hashes)
        gone = {i for i, h in zip(missing, hashes) if h in known}
    return found, held, [i for i in missing if i in gone], [i for i in missing if i not in gone]


def _second_places(store, m: Manifest, later: dict, missing: list, found: dict) -> list:
    """Look for the ids not found at their first place at their second (a deletion-aware placement): adds
    them to ``found``; returns the ids found nowhere."""
    groups: dict[tuple[int, int], list] = {}
    rest = []
    for i in missing:
        (groups.setdefault(later[i], []) if i in later else rest).append(i)
    for (s, j), group in groups.items():
        present = set(read_slice(store, m.shards[s].slices[j].to_dict())["id"].tolist())
        hit = {i for i in group if i in present}
        if hit:
            found.setdefault((s, j), set()).update(hit)
        rest += [i for i in group if i not in present]
    return rest


@dataclass(frozen=True)
class Location:
    """Where one id is: ``where`` is "training" (``shard`` and ``slice``, both 0-based as `shard_of`),
    "held_out" (a row of the evaluation file), "base" (a non-erasable base row), "deleted" (``request_id`` and ``deleted_at``, a Unix time, of
    the latest deletion request that named it) or "unknown" (never a row of this ensemble)."""

    id: int | str
    where: str
    shard: int | None = None
    slice: int | None = None
    request_id: str | None = None
    deleted_at: float | None = None

    @property
    def found(self) -> bool:
        """A row the ensemble holds now (training or held out)."""
        return self.where in ("training", "held_out")


def where(ctx, m: Manifest, ids: list) -> list[Location]:
    """One `Location` per canonical id, in the order given. Reads only the slices these ids hash to and the
    ledger entries of their keyed hashes: nothing about any other id."""
    found, held, gone, unknown = locate(ctx, m, ids)
    base = set(base_rows_named(ctx, m, unknown))
    at = {i: sj for sj, group in found.items() for i in group}
    hashes = dict(zip(gone, ctx.workdir.hash_ids(gone))) if gone else {}
    deleted = ctx.ledger().deletions(list(hashes.values())) if gone else {}
    out = []
    for i in ids:
        if i in at:
            out.append(Location(i, "training", *at[i]))
        elif i in held:
            out.append(Location(i, "held_out"))
        elif hashes.get(i) in deleted:
            rid, created = deleted[hashes[i]]
            out.append(Location(i, "deleted", request_id=rid, deleted_at=created))
        elif i in base:
            out.append(Location(i, "base"))
        else:
            out.append(Location(i, "unknown"))
    return out


def first_stages(found) -> dict[int, int]:
    """{shard: first stage to retrain (1-based)} for the (shard, slice) pairs that hold rows."""
    out: dict[int, int] = {}
    for s, j in found:
        out[s] = min(out.get(s, j + 1), j + 1)
    return out


def unknown_error(ctx, unknown) -> UnknownIdsError:
    shown = ", ".join(repr(i) for i in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
    rows = evalfile.read(ctx.workdir.path)
    unnamed = (
        f" ({len(rows)} evaluation rows of this workdir were stored without ids and cannot be named)"
        if rows is not None and len(rows) and not evalfile.has_ids(rows)
        else ""
    )
    return UnknownIdsError(
        f"{len(unknown)} id(s) are neither training nor evaluation rows of this ensemble and were never deleted "
        f"from it: {shown}{unnamed}. Nothing was changed; check the ids (and their type) and call delete() again",
        ids=unknown[:5],
    )


def base_rows_named(ctx, m: Manifest, ids: list) -> list:
    """The ids among ``ids`` that are base rows of ``m`` (their rows are stored when they have ids)."""
    if m.base is None or m.base.rows_file is None or not ids:
        return []
    rows = read_slice(ctx.storage(), m.base.rows_file.to_dict())
    if "id" not in (rows.dtype.names or ()):
        return []
    present = set(rows["id"].tolist())
    return [i for i in ids if i in present]


def base_error(n: int) -> DataError:
    return DataError(
        f"{n} id(s) are base rows, declared non-erasable at fit (fit(base=...) or data.base): delete cannot "
        "erase them, since every shard starts from the model trained on them. To remove base data, refit "
        "without those rows (fit(..., base=the remaining base rows, overwrite=True)). Nothing was changed",
        ids=[],
    )
