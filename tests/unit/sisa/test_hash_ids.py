"""The ledger's and receipts' id hashes (`Workdir.hash_ids`, keyed once and copied per id on a deletion's
path) are HMAC-SHA256 under the workdir's secret of each id's canonical bytes, as written by every
earlier version: a ledger written before still matches."""

import hashlib
import hmac

from hypothesis import given, settings
from hypothesis import strategies as st

from shards.partition import id_bytes
from sisa.workdir import Workdir

ids = st.lists(st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=20)), max_size=20)


@settings(max_examples=50, deadline=None)
@given(ids)
def test_hashes_are_hmac_sha256_of_each_id(tmp_path_factory, batch):
    wd = Workdir(tmp_path_factory.mktemp("w"))
    key = wd.secret()
    assert wd.hash_ids(batch) == [hmac.new(key, id_bytes(i), hashlib.sha256).hexdigest() for i in batch]
    assert wd.hash_ids(["u-1", 7]) == [
        hmac.new(key, b"s:u-1", hashlib.sha256).hexdigest(),
        hmac.new(key, b"i:7", hashlib.sha256).hexdigest(),
    ]
