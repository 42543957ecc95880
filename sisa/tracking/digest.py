"""Digests that bind a published MLflow model to the workdir's deployed checkpoints, and their checks.

A published ensemble version is a pyfunc model directory (written by `sisa.tracking.pyfunc.save`):

    MLmodel, conda.yaml, python_env.yaml, requirements.txt
    data/ensemble/ensemble.json   architecture, aggregation, and the digests below
    data/ensemble/shards/<s>.pt   shard s's state dict, one file per active shard

No code travels in it: MLmodel names the installed module ``sisa.tracking.pyfunc`` as its ``loader_module``,
so MLflow runs no script from the artifact. The chain of digests:

- ``ensemble.json`` records, per shard, the sha256 of the deployed checkpoint, of the state-dict tensors
  taken from it and of its weights file (``files``); ``LOADER_SHA256`` (the digest of the pyfunc flavor
  this sisa writes and accepts); and a digest of its own content.
- the digest of every file of the directory (``files``) is recorded, after saving, in the registered
  model version's tags and in the workdir's publish record ``mlflow-model.json``, signed with a key
  derived from ``secret.key``, so `sisa audit` detects a consistent rewrite of the artifact too.

`check_model_dir` runs these checks on a local model directory before anything in it is used; it raises
`IntegrityError` naming the file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from shards.errors import IntegrityError

FORMAT = 3  # 2: one weights.pt for every shard; 3: one file per shard (a publish rewrites changed shards only)
LOADER_MODULE = "sisa.tracking.pyfunc"
DATA = "data/ensemble"  # where MLflow copies the data directory inside the model directory
META = "ensemble.json"
RECORD = "mlflow-model.json"  # the publish record in the workdir
# The pyfunc flavor fields that decide which code MLflow runs at load time: exactly these, nothing else.
FLAVOR = {"loader_module": LOADER_MODULE, "data": DATA, "code": None, "python_model": None, "predict_fn": None}
LOADER_SHA256 = hashlib.sha256(
    json.dumps({"sisa pyfunc loader": FORMAT, **FLAVOR}, sort_keys=True).encode()
).hexdigest()
WHAT_TO_DO = (
    "Do not serve it. Run `sisa audit --workdir WORKDIR --all` to see what changed, then `sisa publish "
    "--workdir WORKDIR` to publish the deployed ensemble again, and load models:/<name>@current afresh"
)


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


ENCODER = "encoder"  # model.encoder: its state dict's key, bound like a shard's
ENCODER_FILE = "shards/encoder.pt"


def shard_file(shard) -> str:
    """A shard's weights file, relative to the data directory (`DATA`)."""
    return f"shards/{int(shard)}.pt"


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(state_dict) -> str:
    """sha256 over every tensor's name, dtype, shape and raw bytes, in name order."""
    import torch

    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(canonical([k, str(t.dtype), list(t.shape)]))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def meta_digest(meta: dict) -> str:
    """Digest of ensemble.json's content (every field but ``digest`` itself)."""
    return hashlib.sha256(canonical({k: v for k, v in meta.items() if k != "digest"})).hexdigest()


# MLflow itself writes this into a local model folder whenever models:/<name>... is loaded from it: the
# registered name and version, read as YAML data (never executed). It is the one file not published.
MLFLOW_META = "registered_model_meta"


def mlflow_files(root) -> dict[str, str]:
    """{relative path: sha256} of MLflow's own files of the model folder ``root`` (MLmodel, the environment
    files): everything but the data folder and `MLFLOW_META`. ``ensemble.json`` records them, so that
    MLflow's own loader (which reads MLmodel before sisa's code runs) refuses a changed one too."""
    root = Path(root)
    out = {}
    for p in files_under(root):
        rel = p.relative_to(root).as_posix()
        if rel != MLFLOW_META and not rel.startswith(DATA.split("/")[0] + "/"):
            out[rel] = file_sha256(p)
    return out


def files_under(root) -> list[Path]:
    """Every file under ``root``, in path-string order: what ``root.rglob("*")`` lists that ``is_file()``
    (a link to a file included, a linked folder not entered, an unreadable folder skipped), found with
    ``scandir``, whose entries know their type without a stat (three times faster than rglob)."""
    out, folders = [], [os.fspath(root)]
    while folders:
        try:
            entries = os.scandir(folders.pop())
        except OSError:  # missing, not a folder, or unreadable
            continue
        with entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    folders.append(e.path)
                elif e.is_file():
                    out.append(e.path)
    return [Path(p) for p in sorted(out)]


def tree_digests(root: Path, known: dict[str, str] | None = None) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root`` (but MLflow's ``registered_model_meta``);
    ``known``: digests already computed for some of them (the weights, hashed as they were written)."""
    root = Path(root)
    known = known or {}
    rels = (p.relative_to(root).as_posix() for p in files_under(root))
    return {rel: known.get(rel) or file_sha256(root / rel) for rel in rels if rel != MLFLOW_META}


def _fail(path, what: str) -> IntegrityError:
    return IntegrityError(f"{path}: {what}. {WHAT_TO_DO}", path=str(path))


# -- load-time checks ---------------------------------------------------------------------------------
def check_flavor(root: Path) -> None:
    """MLmodel's pyfunc flavor must load through the installed ``sisa.tracking.pyfunc`` and nothing else."""
    import yaml

    path = Path(root) / "MLmodel"
    try:
        conf = (yaml.safe_load(path.read_text()) or {}).get("flavors", {}).get("python_function", {})
    except (OSError, yaml.YAMLError) as e:
        raise _fail(path, f"cannot be read as the model's metadata ({e})") from None
    bad = {
        k: conf.get(k)
        for k, want in FLAVOR.items()
        if conf.get(k) != want and not (k == "predict_fn" and conf.get(k) == "predict")
    }
    if bad:
        raise _fail(path, f"its python_function flavor runs other code than the installed sisa ({bad})")


def check_model_dir(root: Path, files: dict[str, str] | None = None):
    """Verify a local pyfunc model directory; returns (meta, weights). ``files``: the published
    {relative path: sha256} from the registry or the publish record, checked first when given."""
    root = Path(root)
    if files is not None:
        check_files(root, files, where=str(root))
    check_flavor(root)
    data = root / DATA
    meta = _check_meta(data / META)
    if "mlflow_files" in meta:  # absent from older versions: their MLflow files are checked by sisa.files only
        problems = diff_files(mlflow_files(root), meta["mlflow_files"], str(root))
        if problems:
            raise IntegrityError(f"{problems[0]}. {WHAT_TO_DO}", path=problems[0].split(":")[0])
    extra = sorted(
        rel
        for rel in (p.relative_to(data).as_posix() for p in data.rglob("*") if not p.is_dir())
        if rel != META and rel not in meta["files"]
    )
    if extra:
        raise _fail(data / extra[0], "is not part of a sisa ensemble model")
    keys = [*meta["shards"], *([ENCODER] if meta.get("encoder") is not None else [])]
    return meta, {str(s): _shard_weights(data, meta, s) for s in keys}


def _check_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise _fail(path, f"is missing or not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise _fail(path, f"holds a sisa ensemble of format {meta.get('format')}, not {FORMAT}")
    if meta.get("digest") != meta_digest(meta):
        raise _fail(path, "its content does not match its recorded digest (a field was edited)")
    if meta.get("loader_sha256") != LOADER_SHA256:
        raise _fail(path, "was published for another loader than the installed sisa.tracking.pyfunc")
    return meta


def _shard_weights(data: Path, meta: dict, s) -> dict:
    """Shard ``s``'s state dict (or the encoder's, ``s`` = `ENCODER`), read only after its file's sha256
    matched ``ensemble.json``."""
    import torch

    rel = ENCODER_FILE if s == ENCODER else shard_file(s)
    path = data / rel
    if not path.is_file() or file_sha256(path) != meta["files"].get(rel):
        raise _fail(path, f"its sha256 is not the one recorded in {META}")
    weights = torch.load(path, map_location="cpu", weights_only=True)
    if state_dict_sha256(weights) != meta["state_dicts"][str(s)]:
        of = f"the start {meta['encoder']['sha256']}" if s == ENCODER else f"checkpoint {meta['checkpoints'][str(s)]}"
        raise _fail(path, f"the tensors of {'the encoder' if s == ENCODER else f'shard {s}'} differ from those of {of}")
    return weights


def check_files(root: Path, files: dict[str, str], where: str) -> list[str]:
    """Raise naming the first file of ``root`` that differs from ``files`` (missing, changed or extra)."""
    problems = diff_files(tree_digests(root), files, where)
    if problems:
        raise IntegrityError(f"{problems[0]}. {WHAT_TO_DO}", path=problems[0].split(":")[0])
    return problems


def diff_files(got: dict[str, str], want: dict[str, str], where: str) -> list[str]:
    out = [
        f"{where}/{f}: sha256 differs from the published digest" for f in sorted(got) if f in want and got[f] != want[f]
    ]
    out += [f"{where}/{f}: missing (published with sha256 {want[f][:12]})" for f in sorted(set(want) - set(got))]
    out += [f"{where}/{f}: a file that was not published" for f in sorted(set(got) - set(want))]
    return out


# -- the publish record in the workdir ---------------------------------------------------------------
def _record_key(workdir) -> bytes:
    return hmac.new(workdir.secret(), b"sisa model publish record v1", hashlib.sha256).digest()


def write_record(workdir, record: dict) -> None:
    from sisa.workdir import write_atomic

    body = {k: v for k, v in record.items() if k != "signature"}
    sig = hmac.new(_record_key(workdir), canonical(body), hashlib.sha256).hexdigest()
    write_atomic(workdir.path / RECORD, json.dumps({**body, "signature": sig}, indent=1, sort_keys=True).encode())


def read_record(workdir) -> tuple[dict | None, str | None]:
    """(record, problem): the signed publish record, or None and why it cannot be trusted."""
    path = workdir.path / RECORD
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"{path} is missing: no verified model was published from this workdir"
    except ValueError as e:
        return None, f"{path} is not valid JSON ({e})"
    body = {k: v for k, v in rec.items() if k != "signature"}
    want = hmac.new(_record_key(workdir), canonical(body), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(str(rec.get("signature", "")), want):
        return None, f"{path}: field 'signature' does not match its content (HMAC with the workdir key)"
    return rec, None
