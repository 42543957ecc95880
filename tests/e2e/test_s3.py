"""The shard store on a real S3 endpoint: moto's S3 server (PyPI moto[server]) on 127.0.0.1, reached
through s3fs like any S3. fit -> delete -> reopen -> predict gives the same weights as a local fit
without the rows, and afterwards no object in the bucket (no version either) holds a deleted row, its id
or a superseded checkpoint."""

import hashlib
import io
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs  # the test extra installs it (and moto[server])
from helpers import scan, tiny_config, tiny_data, weights_equal

from sisa import SisaEnsemble
from sisa.errors import ConfigError, IntegrityError, WorkdirError
from sisa.ops import purge


@pytest.fixture(scope="module")
def endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto_server did not start on {url}")
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def opts(url, **more) -> dict:
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": url}, **more}


@pytest.fixture
def bucket(endpoint):
    fs = s3fs.S3FileSystem(**opts(endpoint), skip_instance_cache=True)
    name = f"sisa-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    return fs, name


def all_versions(fs, bucket) -> list[dict]:
    """Every stored object version (and delete marker) in the bucket."""
    out, kw = [], {}
    while True:
        page = fs.call_s3("list_object_versions", Bucket=bucket, **kw)
        out += [{**v, "marker": False} for v in page.get("Versions", [])]
        out += [{**v, "marker": True} for v in page.get("DeleteMarkers", [])]
        if not page.get("IsTruncated"):
            return out
        kw = {"KeyMarker": page["NextKeyMarker"], "VersionIdMarker": page["NextVersionIdMarker"]}


def scan_bucket(fs, bucket, needles) -> list[tuple[str, bytes]]:
    """(key, needle) for every needle found in any stored version of any object."""
    from fsspec.asyn import sync

    async def get(key, version):
        body = (await fs._call_s3("get_object", Bucket=bucket, Key=key, VersionId=version))["Body"]
        async with body as stream:
            return await stream.read()

    hits = []
    for v in all_versions(fs, bucket):
        if not v["marker"]:
            data = sync(fs.loop, get, v["Key"], v["VersionId"])
            hits += [(v["Key"], n) for n in needles if n in data]
    return hits


def marked_rows(n=300):
    """Data whose rows to delete are easy to find as bytes: distinctive float32 values and ids."""
    X, y, ids = tiny_data(n=n)
    ids = ids.astype("<U32")
    marked = [3, 60, 61, 222]
    for k, r in enumerate(marked):
        X[r] = np.float32(27183.5 + k) + np.arange(X.shape[1], dtype=np.float32)
        ids[r] = f"ERASE-ME-{k}-qx"
    needles = [X[r].tobytes() for r in marked] + [ids[r].encode() for r in marked]
    needles += [ids[r].encode("utf-32-le") for r in marked]  # how numpy stores str ids
    return X, y, ids, [ids[r] for r in marked], needles


def keys(fs, bucket, prefix="ens/") -> set[str]:
    fs.invalidate_cache()
    return {p.split("/", 1)[1].removeprefix(prefix) for p in fs.find(f"{bucket}/{prefix}")}


def referenced(ens) -> set[str]:
    return {e["file"] for sh in ens.manifest["shards"] for e in sh["slices"] + sh["checkpoints"]}


def checkpoints(ens) -> set[str]:
    return {c["file"] for sh in ens.manifest["shards"] for c in sh["checkpoints"]}


def test_fit_delete_reopen_predict_on_s3_leaves_nothing_behind(tmp_path, bucket, endpoint):
    fs, name = bucket
    X, y, ids, gone, needles = marked_rows()
    cfg = tiny_config(storage={"uri": f"s3://{name}/ens", "options": opts(endpoint)})
    wd = tmp_path / "w"
    ens = SisaEnsemble.from_config(cfg, wd).fit(X, y, ids=ids)
    assert not (wd / "store").exists(), "data and checkpoints went to the bucket, not the workdir"
    assert keys(fs, name) == referenced(ens) | {"OWNER"}
    before = {n for _, n in scan_bucket(fs, name, needles)}
    assert {X[r].tobytes() for r in (3, 60, 61, 222)} <= before, "the scan finds the rows before the deletion"
    old_ckpts = checkpoints(ens)

    receipt = ens.delete(gone)
    ens.close()
    assert receipt.rows_deleted == len(gone)
    reopened = SisaEnsemble.open(wd)
    keep = ~np.isin(ids, gone)
    ref = SisaEnsemble.from_config(tiny_config(), tmp_path / "ref").fit(X[keep], y[keep], ids=ids[keep])
    assert weights_equal(reopened, ref), "fit(D).delete(S) on S3 == fit(D \\ S) on a local disk"
    assert np.array_equal(reopened.predict_proba(X), ref.predict_proba(X))
    assert referenced(reopened) == referenced(ref), "the same content-addressed names on both stores"

    assert scan_bucket(fs, name, needles) == [], "no object holds a deleted row or id"
    assert scan(wd, needles) == [], "nor does anything in the local workdir"
    superseded = old_ckpts - checkpoints(reopened)
    assert superseded, "the deletion retrained something"
    assert keys(fs, name) == referenced(reopened) | {"OWNER"}, "no superseded slice or checkpoint is left"
    assert not superseded & keys(fs, name)

    # purge: objects no manifest references (e.g. of a crashed writer) are removed, nothing else
    fs.pipe_file(f"{name}/ens/ckpt/shard-000/stage-01-deadbeef0000.pt", b"stray")
    fs.pipe_file(f"{name}/ens/data/shard-001/slice-00-deadbeef0000.npy", b"stray")
    assert sorted(purge.unreferenced(reopened._ctx, reopened.manifest)) == [
        "ckpt/shard-000/stage-01-deadbeef0000.pt",
        "data/shard-001/slice-00-deadbeef0000.npy",
    ]
    assert keys(fs, name) == referenced(reopened) | {"OWNER"}


def test_versioned_bucket_keeps_old_versions_unless_version_aware(tmp_path, endpoint):
    fs = s3fs.S3FileSystem(**opts(endpoint), skip_instance_cache=True)
    X, y, ids, gone, needles = marked_rows(240)
    results = {}
    for versioned, aware in ((True, False), (True, True), (False, True)):
        name = f"sisa-v-{uuid.uuid4().hex[:10]}"
        fs.mkdir(name)
        if versioned:
            fs.make_bucket_versioned(name)
        options = opts(endpoint, version_aware=True) if aware else opts(endpoint)
        cfg = tiny_config(storage={"uri": f"s3://{name}/ens", "options": options})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ens = SisaEnsemble.from_config(cfg, tmp_path / f"w{versioned}{aware}").fit(X, y, ids=ids)
        warned = [str(w.message) for w in caught if "versioning enabled" in str(w.message)]
        ens.delete(gone)
        ens.close()
        reopened = SisaEnsemble.open(tmp_path / f"w{versioned}{aware}")
        results[versioned, aware] = (warned, scan_bucket(fs, name, needles), all_versions(fs, name), reopened)
    warned, hits, versions, _ = results[True, False]
    assert warned and "version_aware" in warned[0] and "NoncurrentVersionExpiration" in warned[0]
    assert hits, "a versioned bucket keeps the deleted rows as noncurrent versions: the README's warning"
    for case in ((True, True), (False, True)):  # version-aware, on a versioned and on a plain bucket
        warned, hits, versions, reopened = results[case]
        assert not warned
        assert hits == [], "version-aware deletion removes every version"
        assert not any(v["marker"] for v in versions) and all(v["IsLatest"] for v in versions)
        assert {v["Key"].removeprefix("ens/") for v in versions} == referenced(reopened) | {"OWNER"}
    assert weights_equal(results[True, True][3], results[False, True][3])


def test_ray_workers_read_and_write_the_bucket(tmp_path, bucket, endpoint, ray_session):
    fs, name = bucket
    X, y, ids = tiny_data(n=240)
    cfg = tiny_config(storage={"uri": f"s3://{name}/ens", "options": opts(endpoint)}, cluster={"executor": "ray"})
    ens = SisaEnsemble.from_config(cfg, tmp_path / "ray").fit(X, y, ids=ids)
    gone = [ids[5], ids[100]]
    ens.delete(gone)
    keep = ~np.isin(ids, gone)
    ref = SisaEnsemble.from_config(tiny_config(), tmp_path / "ref").fit(X[keep], y[keep], ids=ids[keep])
    assert weights_equal(ens, ref)
    assert keys(fs, name) == referenced(ens) | {"OWNER"}


def write_train_parts(fs, name, X, y, ids) -> None:
    """The rows as two Parquet files of several row groups under s3://<bucket>/in/train/."""
    t = pa.table({"id": ids, **{f"f{k}": X[:, k] for k in range(X.shape[1])}, "label": y})
    for k, part in enumerate((t.slice(0, 130), t.slice(130))):
        with fs.open(f"{name}/in/train/part-{k}.parquet", "wb") as f:
            pq.write_table(part, f, row_group_size=40)


def test_parquet_dataset_read_from_the_bucket(tmp_path, bucket, endpoint):
    fs, name = bucket
    X, y, ids = tiny_data(n=260)
    write_train_parts(fs, name, X, y, ids)
    cfg = tiny_config(
        data={"source": "parquet", "path": f"s3://{name}/in/train", "test_fraction": 0.0},
        storage={"uri": f"s3://{name}/ens", "options": opts(endpoint)},
    )
    a = SisaEnsemble.from_config(cfg, tmp_path / "a").fit()
    b = SisaEnsemble.from_config(tiny_config(), tmp_path / "b").fit(X, y, ids=ids)
    assert weights_equal(a, b)
    assert [e["sha256"] for sh in a.manifest["shards"] for e in sh["slices"]] == [
        e["sha256"] for sh in b.manifest["shards"] for e in sh["slices"]
    ]


def test_parquet_dataset_ingested_on_ray_from_the_bucket(tmp_path, bucket, endpoint, ray_session):
    """Ray Data workers read the files from the bucket and write the slices to it (`orchestration.ingest`):
    the slices, held-out rows and weights of the single-process ingest; nothing staged is left behind."""
    fs, name = bucket
    X, y, ids = tiny_data(n=260)
    write_train_parts(fs, name, X, y, ids)

    def cfg(prefix, executor):
        return tiny_config(
            data={"source": "parquet", "path": f"s3://{name}/in/train", "test_fraction": 0.2},
            storage={"uri": f"s3://{name}/{prefix}", "options": opts(endpoint)},
            cluster={"executor": executor},
        )

    a = SisaEnsemble.from_config(cfg("ray", "ray"), tmp_path / "a").fit()
    b = SisaEnsemble.from_config(cfg("one", "inprocess"), tmp_path / "b").fit()
    assert [sh["slices"] for sh in a.manifest["shards"]] == [sh["slices"] for sh in b.manifest["shards"]]
    assert weights_equal(a, b)
    assert (tmp_path / "a" / "eval.npy").read_bytes() == (tmp_path / "b" / "eval.npy").read_bytes()
    assert keys(fs, name, "ray/") == referenced(a) | {"OWNER"}, "the staged held-out rows are removed"


def test_one_prefix_per_workdir_and_clear_errors(tmp_path, bucket, endpoint):
    fs, name = bucket
    X, y, ids = tiny_data(n=150)
    cfg = tiny_config(storage={"uri": f"s3://{name}/ens", "options": opts(endpoint)})
    first = SisaEnsemble.from_config(cfg, tmp_path / "one").fit(X, y, ids=ids)
    before = keys(fs, name)
    with pytest.raises(WorkdirError, match="already used by another workdir.*own storage.uri prefix"):
        SisaEnsemble.from_config(cfg, tmp_path / "two").fit(X, y, ids=ids)
    assert keys(fs, name) == before and not (tmp_path / "two" / "manifest.json").exists()
    # the owner itself may refit (overwrite) into its prefix
    SisaEnsemble.from_config(cfg, tmp_path / "one").fit(X[:120], y[:120], ids=ids[:120], overwrite=True)
    assert keys(fs, name) == referenced(SisaEnsemble.open(tmp_path / "one")) | {"OWNER"}
    assert first.workdir.path == (tmp_path / "one").resolve()

    missing = tiny_config(storage={"uri": "s3://no-such-bucket-zz/ens", "options": opts(endpoint)})
    with pytest.raises(WorkdirError, match="cannot use storage s3://no-such-bucket-zz/ens.*bucket exists"):
        SisaEnsemble.from_config(missing, tmp_path / "three").fit(X, y, ids=ids)
    assert not (tmp_path / "three" / "manifest.json").exists()


def test_an_unowned_prefix_with_files_is_refused(tmp_path, bucket, endpoint):
    fs, name = bucket
    fs.pipe_file(f"{name}/ens/data/report.csv", b"someone else's file")
    X, y, ids = tiny_data(n=120)
    cfg = tiny_config(storage={"uri": f"s3://{name}/ens", "options": opts(endpoint)})
    with pytest.raises(WorkdirError, match="no sisa workdir owns.*empty prefix"):
        SisaEnsemble.from_config(cfg, tmp_path / "w").fit(X, y, ids=ids)
    assert keys(fs, name) == {"data/report.csv"}, "nothing written, nothing purged"


def test_shared_mount_as_file_uri(tmp_path):
    """A shared mount every node sees (here a directory outside the workdir), named by an explicit
    file:// URI; the workdir with its ledger stays on local disk."""
    X, y, ids, gone, needles = marked_rows(240)
    shared = tmp_path / "mnt" / "shared" / "run1"
    cfg = tiny_config(storage={"uri": f"file://{shared}"})
    ens = SisaEnsemble.from_config(cfg, tmp_path / "w").fit(X, y, ids=ids)
    assert not (tmp_path / "w" / "store").exists()
    files = {str(p.relative_to(shared)) for p in shared.rglob("*") if p.is_file()}
    assert files == referenced(ens) | {"OWNER"}
    ens.delete(gone)
    ens.close()
    reopened = SisaEnsemble.open(tmp_path / "w")
    keep = ~np.isin(ids, gone)
    ref = SisaEnsemble.from_config(tiny_config(), tmp_path / "ref").fit(X[keep], y[keep], ids=ids[keep])
    assert weights_equal(reopened, ref)
    assert scan(shared, needles) == [] and scan(tmp_path / "w", needles) == []
    assert {str(p.relative_to(shared)) for p in shared.rglob("*") if p.is_file()} == referenced(reopened) | {"OWNER"}
    with pytest.raises(WorkdirError, match="already used by another workdir"):
        SisaEnsemble.from_config(cfg, tmp_path / "w2").fit(X, y, ids=ids)
    with pytest.raises(ConfigError, match="needs an absolute path"):
        SisaEnsemble.from_config(tiny_config(storage={"uri": "file://rel/dir"}), tmp_path / "w3").storage()


def test_audit_and_repair_work_on_the_bucket(tmp_path, bucket, endpoint):
    fs, name = bucket
    X, y, ids = tiny_data(n=240)
    cfg = tiny_config(storage={"uri": f"s3://{name}/ens", "options": opts(endpoint)})
    ens = SisaEnsemble.from_config(cfg, tmp_path / "w").fit(X, y, ids=ids)
    receipt = ens.delete([ids[3], ids[77]])
    report = ens.verify(receipt)  # retrains the receipt's shards in a fresh process, reading the bucket
    assert report.ok, report.text()
    lost = ens.manifest["shards"][0]["checkpoints"][1]
    fs.rm_file(f"{name}/ens/{lost['file']}")
    assert ens.repair()["unrepairable"] == []
    assert hashlib.sha256(fs.cat_file(f"{name}/ens/{lost['file']}")).hexdigest() == lost["sha256"]
    assert ens.verify().ok


def test_model_init_and_base_data_on_the_bucket(tmp_path, bucket, endpoint):
    """model.init read from s3:// (digest checked first), the shared start stored in the bucket beside the
    shards, and a refit without base data removes the base rows and their start from there."""
    import torch

    fs, name = bucket
    X, y, ids = tiny_data()
    donor = SisaEnsemble.from_config(tiny_config(sharding={"shards": 1, "slices": 1}), tmp_path / "d").fit(
        X, y, ids=ids
    )
    buf = io.BytesIO()
    torch.save(donor.load_shard_model(0).state_dict(), buf)
    fs.pipe_file(f"{name}/models/init.pt", buf.getvalue())
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    store = {"uri": f"s3://{name}/ens", "options": opts(endpoint)}
    model = tiny_config()["model"] | {"init": {"uri": f"s3://{name}/models/init.pt", "sha256": "f" * 64}}
    with pytest.raises(IntegrityError, match="model.init.sha256 says ffff"):
        SisaEnsemble.from_config(tiny_config(model=model, storage=store), tmp_path / "bad").fit(X, y, ids=ids)
    model["init"]["sha256"] = digest
    base = (X[:30] + 1, y[:30], np.array([f"b-{i}" for i in range(30)]))
    ens = SisaEnsemble.from_config(tiny_config(model=model, storage=store), tmp_path / "a")
    ens.fit(X, y, ids=ids, base=base)
    assert ens.manifest.base.init_sha256 == digest
    assert {k for k in keys(fs, name) if k.startswith("base/")} == {
        ens.manifest.base.file,
        ens.manifest.base.rows_file.file,
    }
    ens.fit(X, y, ids=ids, overwrite=True)  # model.init alone: the start is the pretrained state dict
    assert ens.manifest.base.rows == 0 and ens.manifest.base.file.startswith("base/init-")
    assert {k for k in keys(fs, name) if k.startswith("base/")} == {ens.manifest.base.file}
