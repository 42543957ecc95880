"""The audit's fresh-process retrain: each shard is trained again from scratch in a new Python process on
the live slices, into a scratch store, and compared bit for bit with the deployed checkpoints
(`python -m sisa.audit OUT` runs `retrain_worker`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

from shards.errors import SisaError, WorkdirError


def check_retrain(report, ctx, manifest, store, shards: list[int], timeout) -> None:
    import torch

    from shards import training

    if not shards:
        return
    scratch = tempfile.mkdtemp(prefix="sisa-audit-")
    try:
        job = {
            "storage": store.root,
            "options": store.storage_options,
            "scratch": scratch,
            "spec": asdict(ctx.spec(manifest)),
            "shards": {str(s): [e.to_dict() for e in manifest.shards[s].slices] for s in shards},
            "epochs": {str(s): list(manifest.shards[s].epochs) for s in shards if manifest.shards[s].epochs},
            # the shared start (shards.base), read from the live store and digest-checked before it is loaded
            "start": manifest.base.entry() if manifest.base else None,
        }
        t0 = time.time()
        out = os.path.join(scratch, "result.json")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        proc = subprocess.run(
            [sys.executable, "-m", "sisa.audit", out],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        report.retrain_seconds = time.time() - t0
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            for s in shards:
                report.add(
                    f"shard {s}", "retrained from scratch", [f"the retraining process failed: {' | '.join(tail)}"]
                )
            return
        result = json.loads(open(out).read())
        report.worker_pid = result["pid"]
        from shards.storage import Storage

        fresh = Storage(scratch)
        for s in shards:
            _compare(report, s, result["shards"][str(s)], manifest.shards[s].checkpoints, store, fresh, training, torch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _compare(report, s, got: dict, deployed, store, fresh, training, torch) -> None:
    target = f"shard {s}"
    if "error" in got:
        report.add(target, "retrained from scratch", [f"retraining failed: {got['error']}"])
        return
    ret = got["checkpoints"]
    problems = [
        f"stage {k + 1}: retrained checkpoint sha256 {a['sha256'][:12]} != deployed {store.describe(b.file)} ({b.sha256[:12]})"
        for k, (a, b) in enumerate(zip(ret, deployed))
        if not _same_checkpoint(a["sha256"], b, store, training)
    ]
    if len(ret) != len(deployed):
        problems.append(f"{len(ret)} stages retrained but {len(deployed)} checkpoints deployed")
    report.add(target, "retrained checkpoint digests = deployed digests", problems)
    a = training.load_checkpoint(fresh.read(ret[-1]["file"], ret[-1]["sha256"]))["state_dict"]
    try:
        b = training.load_checkpoint(store.read(deployed[-1].file), store.describe(deployed[-1].file))
    except SisaError as e:
        report.add(target, "weights retrained from scratch = deployed weights (torch.equal)", [str(e).split(";")[0]])
        return
    b = b["state_dict"]
    diff = sorted(set(a) ^ set(b)) + [k for k in a if k in b and not torch.equal(a[k], b[k])]
    report.add(
        target,
        "weights retrained from scratch = deployed weights (torch.equal)",
        [f"{store.describe(deployed[-1].file)}: tensor(s) {', '.join(diff[:4])} differ"] if diff else [],
    )


def _same_checkpoint(retrained: str, deployed, store, training) -> bool:
    """The retrained checkpoint's digest is the deployed one's; or the deployed file is an older sisa's
    (torch's format, `shards.ckptfile`) whose checkpoint, written in today's format, has that digest."""
    if retrained == deployed.sha256:
        return True
    from shards import ckptfile

    try:
        data = store.read(deployed.file, deployed.sha256)
        if ckptfile.is_own(data):
            return False
        again = training.save_checkpoint(training.load_checkpoint(data, store.describe(deployed.file)))
    except SisaError:
        return False
    return ckptfile.is_own(again) and hashlib.sha256(again).hexdigest() == retrained


# -- the fresh-process worker -------------------------------------------------------------------------
class _LiveSlicesScratchCheckpoints:
    """Reads slice files from the live store (digest-checked); checkpoints go to and come from scratch."""

    def __init__(self, live, scratch):
        self.live, self.scratch = live, scratch

    def _of(self, rel: str):
        return self.scratch if rel.startswith("ckpt/") else self.live

    def read(self, rel: str, digest: str | None = None) -> bytes:
        return self._of(rel).read(rel, digest)

    def write(self, rel: str, data: bytes, durable: bool = True, digest: str | None = None) -> str:
        if not rel.startswith("ckpt/"):
            raise WorkdirError(f"the audit never writes into the live store (asked to write {rel})")
        return self.scratch.write(rel, data, durable, digest)

    def sync(self, rels: list[str]) -> None:
        self.scratch.sync(rels)

    def local_paths(self, rels: list[str]) -> list[str]:
        return [p for rel in rels for p in self._of(rel).local_paths([rel])]

    def describe(self, rel: str) -> str:
        return self._of(rel).describe(rel)


def retrain_worker(out_path: str) -> None:
    from shards.job import StageRunner
    from shards.spec import TrainSpec
    from shards.storage import Storage

    job = json.loads(sys.stdin.read())
    spec = job["spec"]
    spec = TrainSpec(
        **{**spec, "epochs_per_stage": tuple(spec["epochs_per_stage"]), "input_shape": tuple(spec["input_shape"])}
    )
    storage = _LiveSlicesScratchCheckpoints(Storage(job["storage"], job["options"]), Storage(job["scratch"]))
    runner = StageRunner()
    out: dict = {"pid": os.getpid(), "shards": {}}
    for key, slices in job["shards"].items():
        entries, prev = [], job.get("start")
        own = job.get("epochs", {}).get(key)  # the shard's own schedule (appended stages), else the spec's
        try:
            for stage in range(1, (len(own) if own else spec.slices) + 1):
                prev, _ = runner.run(storage, spec.for_stage(own and tuple(own), stage), int(key), stage, slices, prev)
                entries.append(prev)
            out["shards"][key] = {"checkpoints": entries}
        except SisaError as e:
            out["shards"][key] = {"error": str(e)}
    with open(out_path, "w") as f:
        json.dump(out, f)
