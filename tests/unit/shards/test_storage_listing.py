"""A local store's listing (`Storage.listdir`, on every deletion's purge path) finds what `os.walk` finds:
every file at any depth, temp files included, under the root or a folder of it; links to folders not
followed; a missing folder lists nothing."""

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from shards.storage import Storage

names = st.sampled_from(["a", "b.pt", ".tmp-1", "shard-000", "x y"])
trees = st.lists(st.lists(names, min_size=1, max_size=4), max_size=12)


def walk(store: Storage, rel: str) -> list[str]:
    out = []
    for d, _, files in os.walk(store.path(rel)):
        out += [os.path.relpath(os.path.join(d, f), store.path("")) for f in files]
    return sorted(out)


@settings(max_examples=30, deadline=None)
@given(trees)
def test_listing_equals_os_walk(tmp_path_factory, tree):
    root = tmp_path_factory.mktemp("store")
    for *dirs, name in tree:  # folders "d-*", files "f-*" or a temp file's name
        d = root.joinpath(*(f"d-{x}" for x in dirs))
        d.mkdir(parents=True, exist_ok=True)
        d.joinpath(name if name.startswith(".tmp-") else f"f-{name}").write_bytes(b"x")
    (root / "real").mkdir(exist_ok=True)
    (root / "real" / "f-z").write_bytes(b"x")
    if not (root / "linked").exists():
        os.symlink(root / "real", root / "linked")
    store = Storage(str(root))
    for rel in ("", *{f"d-{p[0]}" for p in tree}, "missing"):
        assert store.listdir(rel) == walk(store, rel)
    assert "real/f-z" in store.listdir() and not any(p.startswith("linked") for p in store.listdir())
