"""The small commands as a new user runs them (subprocesses): `sisa locate` finds ids, `delete --dry-run`
prints a plan for people and valid JSON with --json, errors name the CLI's options, `status` / `locate` /
`delete --dry-run` import neither Ray, Lightning nor torch, `sisa demo` does not silently replace a folder."""

import json
import subprocess
import sys

import pytest
import yaml
from helpers import tiny_config

HEAVY = ("ray", "pytorch_lightning", "lightning", "torch")


def sisa(*args, check=True, importtime=False):
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "sisa.cli", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(out.stdout + out.stderr)
    return out


def strict_json(text: str):
    """json.loads that refuses Infinity / NaN (not JSON, though Python's json writes them by default)."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    """A digits ensemble trained and one deletion made through the CLI; {kind: an id of that kind}."""
    tmp = tmp_path_factory.mktemp("cli-small")
    cfg = tiny_config(data={"source": "digits", "test_fraction": 0.2}, training={"epochs": 1})
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    w = tmp / "w"
    sisa("train", tmp / "c.yaml", "--workdir", w)
    from sisa import evalfile

    held_out = set(evalfile.read(w)["id"].tolist())  # the rest of digits-0..1796 are training rows
    train = [f"digits-{i}" for i in range(60) if f"digits-{i}" not in held_out]
    held = next(f"digits-{i}" for i in range(60) if f"digits-{i}" in held_out)
    sisa("delete", "--workdir", w, "--executor", "inprocess", train[0])
    return w, {"deleted": train[0], "training": train[1], "held_out": held, "unknown": "digits-99999"}


def test_locate_says_where_each_id_is_and_only_those(wd):
    w, ids = wd
    res = sisa("locate", "--workdir", w, ids["training"], ids["held_out"], check=False)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(ids["training"]) and "training row: shard" in lines[0]
    assert lines[1].startswith(ids["held_out"]) and "held-out" in lines[1]

    res = sisa("locate", "--workdir", w, ids["deleted"], ids["unknown"], ids["training"], check=False)
    assert res.returncode == 1  # some ids are not rows of the ensemble
    out = dict(line.split(None, 1) for line in res.stdout.splitlines())
    assert set(out) == {ids["deleted"], ids["unknown"], ids["training"]}  # nothing about any other id
    assert out[ids["deleted"]].startswith("deleted by request ") and "UTC" in out[ids["deleted"]]
    assert out[ids["unknown"]].startswith("unknown")

    (w.parent / "ids.json").write_text(json.dumps([ids["deleted"], ids["training"]]))
    res = sisa(
        "locate", "--workdir", w, "--ids-file", w.parent / "ids.json", "--ids-format", "json", "--json", check=False
    )
    got = strict_json(res.stdout)
    assert res.returncode == 1 and [g["where"] for g in got] == ["deleted", "training"]
    receipts = {p.stem for p in (w / "receipts").glob("*.json")}
    assert got[0]["request_id"] in receipts and got[0]["deleted_at"].endswith("+00:00")
    assert got[1]["first_stage"] == got[1]["slice"] + 1


def test_dry_run_prints_a_plan_and_valid_json(wd):
    w, ids = wd
    text = sisa("delete", "--workdir", w, "--dry-run", ids["training"], ids["held_out"], ids["deleted"]).stdout
    assert text.startswith("dry run: nothing was changed") and "first stage retrained" in text
    assert "sample-epochs against" in text and "cheaper" in text and "expected time: about" in text
    assert "1 held-out row(s)" in text and "skip 1 id(s) already deleted" in text
    plan = strict_json(sisa("delete", "--workdir", w, "--dry-run", "--json", ids["training"]).stdout)
    assert plan["rows"] == 1 and len(plan["shards"]) == 1 and plan["expected_seconds"] > 0
    # only already-deleted ids: nothing to retrain, an infinite speedup, which JSON writes as null
    nothing = strict_json(sisa("delete", "--workdir", w, "--dry-run", "--json", ids["deleted"]).stdout)
    assert nothing["sample_epochs"] == 0 and nothing["speedup"] is None and nothing["already_deleted"] == 1
    st = strict_json(sisa("status", "--workdir", w, "--json").stdout)
    assert st["deletions"]["done"] == 1


def test_errors_name_the_cli_options_and_the_api_keeps_its_words(wd):
    w, ids = wd
    res = sisa("delete", "--workdir", w, "--dry-run", ids["unknown"], check=False)
    assert res.returncode == 2 and repr(ids["unknown"]) in res.stderr
    assert "delete()" not in res.stderr and "sisa locate" in res.stderr
    (w.parent / "empty.txt").write_text("")
    res = sisa("delete", "--workdir", w, "--ids-file", w.parent / "empty.txt", check=False)
    assert res.returncode == 2 and "pass ids" in res.stderr and "--ids-file" in res.stderr
    from sisa import SisaEnsemble, UnknownIdsError

    ens = SisaEnsemble.open(w, executor="inprocess")
    with pytest.raises(UnknownIdsError, match=r"call delete\(\) again"):
        ens.estimate_deletion_cost([ids["unknown"]])
    assert [x.where for x in ens.locate([ids["held_out"], ids["unknown"]])] == ["held_out", "unknown"]


def test_small_commands_import_no_ray_lightning_or_torch(wd):
    w, ids = wd
    for args in (
        ("status", "--workdir", w),
        ("locate", "--workdir", w, ids["training"]),
        ("delete", "--workdir", w, "--dry-run", ids["training"]),
    ):
        res = sisa(*args, importtime=True)
        loaded = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
        assert "sisa.ops.locate" in loaded  # the hook sees the command's imports
        assert not loaded & set(HEAVY), (args[0], sorted(loaded & set(HEAVY)))


def test_demo_refuses_to_replace_a_folder_without_overwrite(tmp_path):
    target = tmp_path / "demo"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    res = sisa("demo", "--workdir", target, check=False)
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert (target / "mine.txt").read_text() == "keep me"
