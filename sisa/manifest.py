"""The manifest: the typed record of what the ensemble is, and the commit point of every change.

Read and written only here (`read`, `write`, `from_dict`, `to_dict`), versioned by `FORMAT`, with a
migration from older formats, so old workdirs open. A deletion reads and writes the manifest several
times while changing one shard: `encode` reuses each unchanged shard's JSON, and `read` returns the
manifest this process last wrote or parsed when the file still holds the same bytes. The classes are frozen: an operation builds a new
`Manifest` (`replace`, `with_shard`) and hands it to the ensemble, which alone commits it.

``manifest["shards"][0]["checkpoints"]`` (dict-style reads of the JSON form) still works for users who
read manifests that way; sisa's own code uses the attributes.
"""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from shards.errors import WorkdirError
from shards.storage import write_atomic

FORMAT = 2
FILE = "manifest.json"


class _JsonView:
    """Read-only dict-style access to the JSON form, for code written against the old dict manifest."""

    def __getitem__(self, key: str):
        return self.to_dict()[key]

    def get(self, key: str, default=None):
        return self.to_dict().get(key, default)


@dataclass(frozen=True)
class SliceRef(_JsonView):
    """One slice file in the store: its content-addressed name, digest and row count; ``risk`` is the sum of
    its rows' deletion priors under a deletion-aware placement (None, and absent from the JSON, otherwise)."""

    file: str
    sha256: str
    rows: int
    risk: float | None = None

    def to_dict(self) -> dict:
        d = {"file": self.file, "sha256": self.sha256, "rows": self.rows}
        if self.risk is not None:
            d["risk"] = self.risk
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SliceRef:
        risk = d.get("risk")
        return cls(file=d["file"], sha256=d["sha256"], rows=int(d["rows"]), risk=None if risk is None else float(risk))


@dataclass(frozen=True)
class Encoder(_JsonView):
    """The frozen encoder (``model.encoder``, `shards.encoder`): the start checkpoint whose body it is, and the
    width of the features it computes. The slices then hold those features, and the shards train heads."""

    file: str | None  # None: a user's module without weights
    sha256: str | None
    width: int
    module: str | None = None  # a user's encoder (model.encoder.module); None: the start's body
    probe: str | None = None  # `shards.encoder.probe` at fit (None in older manifests): its code is unchanged

    def to_dict(self) -> dict:
        d = {"file": self.file, "sha256": self.sha256, "width": self.width}
        if self.module is not None:
            d["module"] = self.module
        if self.probe is not None:
            d["probe"] = self.probe
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Encoder:
        w = int(d["width"])
        return cls(file=d["file"], sha256=d["sha256"], width=w, module=d.get("module"), probe=d.get("probe"))


@dataclass(frozen=True)
class Checkpoint(_JsonView):
    """The checkpoint after one stage of one shard; ``lineage`` digests the slices it trained on."""

    stage: int
    file: str
    sha256: str
    rows: int
    lineage: str

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "file": self.file,
            "sha256": self.sha256,
            "rows": self.rows,
            "lineage": self.lineage,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Checkpoint:
        return cls(stage=int(d["stage"]), file=d["file"], sha256=d["sha256"], rows=int(d["rows"]), lineage=d["lineage"])


@dataclass(frozen=True)
class Start(_JsonView):
    """The stage-0 checkpoint every shard's stage 1 starts from (`shards.base`): a pretrained state dict
    (``init_sha256``, the digest of the ``model.init`` file) and/or a model trained once on the base rows
    (``rows`` of them, stored in ``rows_file``, with their ids when they have some). Never retrained."""

    file: str
    sha256: str
    rows: int
    lineage: str
    init_sha256: str | None = None
    rows_file: SliceRef | None = None

    def to_dict(self) -> dict:
        d = {"file": self.file, "sha256": self.sha256, "rows": self.rows, "lineage": self.lineage}
        d["init_sha256"] = self.init_sha256
        d["rows_file"] = None if self.rows_file is None else self.rows_file.to_dict()
        return d

    def entry(self) -> dict:
        """The checkpoint entry a stage-1 plan resumes from (`orchestration.ShardPlan.prev`)."""
        return {"stage": 0, "file": self.file, "sha256": self.sha256, "rows": self.rows, "lineage": self.lineage}

    @classmethod
    def from_dict(cls, d: dict) -> Start:
        rf = d.get("rows_file")
        return cls(
            file=d["file"],
            sha256=d["sha256"],
            rows=int(d["rows"]),
            lineage=d["lineage"],
            init_sha256=d.get("init_sha256"),
            rows_file=None if rf is None else SliceRef.from_dict(rf),
        )


@dataclass(frozen=True)
class ShardState(_JsonView):
    """A shard's slices, its checkpoints (one per trained stage) and whether prediction excludes it.

    ``epochs`` is the shard's own schedule (one entry per slice) once stages were appended to it
    (``sharding.new_rows: append``); None (and absent from older manifests): the config's schedule."""

    slices: tuple[SliceRef, ...]
    checkpoints: tuple[Checkpoint, ...] = ()
    excluded: bool = False
    epochs: tuple[int, ...] | None = None

    @property
    def rows(self) -> int:
        return sum(e.rows for e in self.slices)

    @property
    def stages(self) -> int:
        """The shard's own stage count: one per slice (the config's R plus any appended)."""
        return len(self.slices)

    def schedule(self, base: tuple[int, ...]) -> tuple[int, ...]:
        """Epochs of each of the shard's stages; ``base`` is the config's schedule."""
        return tuple(base) if self.epochs is None else self.epochs

    @property
    def final(self) -> Checkpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None

    def to_json(self) -> str:
        """Compact JSON with sorted keys, computed once per shard (it is frozen, and the manifests a deletion
        writes share every shard but the retrained ones)."""
        text = self.__dict__.get("_json")
        if text is None:
            text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
            object.__setattr__(self, "_json", text)
        return text

    def to_dict(self) -> dict:
        out = {
            "slices": [e.to_dict() for e in self.slices],
            "checkpoints": [c.to_dict() for c in self.checkpoints],
            "excluded": self.excluded,
        }
        if self.epochs is not None:
            out["epochs"] = list(self.epochs)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> ShardState:
        return cls(
            slices=tuple(SliceRef.from_dict(e) for e in d["slices"]),
            checkpoints=tuple(Checkpoint.from_dict(c) for c in d.get("checkpoints", [])),
            excluded=bool(d.get("excluded", False)),
            epochs=tuple(int(e) for e in d["epochs"]) if d.get("epochs") is not None else None,
        )


@dataclass(frozen=True)
class Retraining(_JsonView):
    """Which request is retraining which shards, and for about how long (for predictors that wait)."""

    request_id: str
    shards: tuple[int, ...]
    started: float
    sample_epochs: int
    expected_seconds: float | None = None

    def to_dict(self) -> dict:
        return {
            "request_id": self.request_id,
            "shards": list(self.shards),
            "started": self.started,
            "sample_epochs": self.sample_epochs,
            "expected_seconds": self.expected_seconds,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Retraining:
        return cls(
            request_id=d["request_id"],
            shards=tuple(d["shards"]),
            started=float(d["started"]),
            sample_epochs=int(d["sample_epochs"]),
            expected_seconds=d.get("expected_seconds"),
        )


@dataclass(frozen=True)
class Manifest(_JsonView):
    """Everything the ensemble is: config hashes, data schema, every shard's files, applied requests."""

    config_hash: str
    training_hash: str
    id_kind: str
    input_shape: list[int]
    num_classes: int
    storage: str
    shards: tuple[ShardState, ...] = ()
    feature_names: list[str] | None = None
    applied_requests: tuple[str, ...] = ()
    metrics: dict = field(default_factory=dict)
    retraining: Retraining | None = None
    created: float = 0.0
    engine: str = "eager"  # training.engine the shards were trained with; absent from older manifests: eager
    precision: str = "32-true"  # training.precision the shards were trained with; absent: 32-true
    base: Start | None = None  # the shared start of every shard (`shards.base`); absent: a fresh init per shard
    encoder: Encoder | None = None  # the frozen encoder whose features the slices hold (`shards.encoder`)
    format: int = FORMAT

    # -- derived views (each defined once) ----------------------------------------------------------------
    def slice_rows(self) -> list[list[int]]:
        """The rows of every (shard, slice): the matrix the cost model works on."""
        return [[e.rows for e in sh.slices] for sh in self.shards]

    def slice_risk(self) -> list[list[float]] | None:
        """The summed deletion prior of every (shard, slice), or None when the slices hold no priors
        (a uniform placement): the weights of `sisa.costmodel.expected_prior`."""
        if not any(e.risk is not None for sh in self.shards for e in sh.slices):
            return None
        return [[e.risk or 0.0 for e in sh.slices] for sh in self.shards]

    def active_shards(self, slices: int | None = None) -> list[int]:
        """Shards that serve predictions: trained through all their own stages (one per slice: the config's
        R plus any appended; ``slices`` is ignored, kept for callers), holding rows, not excluded."""
        return [
            s
            for s, sh in enumerate(self.shards)
            if not sh.excluded and sh.checkpoints and len(sh.checkpoints) == sh.stages and sh.checkpoints[-1].rows > 0
        ]

    def schedules(self, base: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Every shard's own schedule (`ShardState.schedule`): the cost model's per-shard epochs."""
        return [sh.schedule(base) for sh in self.shards]

    def referenced_files(self) -> set[str]:
        """Every store file the manifest names; everything else in the store is garbage."""
        files = {e.file for sh in self.shards for e in (*sh.slices, *sh.checkpoints)}
        if self.base is not None:
            files |= {self.base.file} | ({self.base.rows_file.file} if self.base.rows_file else set())
        if self.encoder is not None and self.encoder.file is not None:
            files.add(self.encoder.file)
        return files

    # -- building the next manifest -----------------------------------------------------------------------
    def with_shard(self, s: int, **changes) -> Manifest:
        shards = list(self.shards)
        shards[s] = replace(shards[s], **changes)
        return replace(self, shards=tuple(shards))

    def with_metrics(self, **metrics) -> Manifest:
        return replace(self, metrics={**self.metrics, **metrics})

    def to_dict(self) -> dict:
        return {**self._top(), "shards": [sh.to_dict() for sh in self.shards]}

    def _top(self) -> dict:
        """Every field of the JSON form but ``shards``."""
        out = {
            "format": FORMAT,
            "config_hash": self.config_hash,
            "training_hash": self.training_hash,
            "id_kind": self.id_kind,
            "input_shape": list(self.input_shape),
            "feature_names": None if self.feature_names is None else list(self.feature_names),
            "num_classes": self.num_classes,
            "storage": self.storage,
            "applied_requests": list(self.applied_requests),
            "metrics": self.metrics,
            "created": self.created,
        }
        if self.retraining is not None:
            out["retraining"] = self.retraining.to_dict()
        if self.engine != "eager":
            out["engine"] = self.engine
        if self.precision != "32-true":
            out["precision"] = self.precision
        if self.base is not None:
            out["base"] = self.base.to_dict()
        if self.encoder is not None:
            out["encoder"] = self.encoder.to_dict()
        return out


def from_dict(d: dict, where: str = "manifest") -> Manifest:
    """A Manifest from its JSON form, migrating older formats (format 1: the untyped dict of sisa 0.1)."""
    fmt = d.get("format")
    if fmt not in (1, FORMAT):
        raise WorkdirError(
            f"{where} was written by an incompatible sisa (manifest format {fmt}; this sisa reads 1 and {FORMAT}): "
            "open it with the sisa that wrote it, or train a new workdir",
            path=where,
        )
    known = {f.name for f in fields(Manifest)}
    extra = set(d) - known
    if extra:
        raise WorkdirError(f"{where} has unknown fields {sorted(extra)}; it was not written by this sisa", path=where)
    try:
        return Manifest(
            config_hash=d["config_hash"],
            training_hash=d["training_hash"],
            id_kind=d["id_kind"],
            input_shape=list(d["input_shape"]),
            num_classes=int(d["num_classes"]),
            storage=d.get("storage", ""),
            shards=tuple(ShardState.from_dict(sh) for sh in d.get("shards", [])),
            feature_names=d.get("feature_names"),
            applied_requests=tuple(d.get("applied_requests", [])),
            metrics=dict(d.get("metrics", {})),
            retraining=Retraining.from_dict(d["retraining"]) if d.get("retraining") else None,
            created=float(d.get("created", 0.0)),
            engine=str(d.get("engine", "eager")),
            precision=str(d.get("precision", "32-true")),
            base=Start.from_dict(d["base"]) if d.get("base") else None,
            encoder=Encoder.from_dict(d["encoder"]) if d.get("encoder") else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise WorkdirError(f"{where} is malformed ({type(e).__name__}: {e})", path=where) from None


_CACHE_SIZE = 16
_cache: dict[str, tuple[bytes, Manifest]] = {}  # manifest path -> the bytes this process last wrote or parsed
_cache_lock = threading.Lock()


def _remember(path: Path, data: bytes, m: Manifest) -> None:
    with _cache_lock:
        _cache.pop(str(path), None)
        _cache[str(path)] = (data, m)
        while len(_cache) > _CACHE_SIZE:
            del _cache[next(iter(_cache))]


def _own(m: Manifest) -> Manifest:
    """A copy whose mutable fields the caller may change without reaching the cached manifest."""
    return replace(
        m,
        metrics=copy.deepcopy(m.metrics),
        input_shape=list(m.input_shape),
        feature_names=None if m.feature_names is None else list(m.feature_names),
    )


def read(workdir_path: Path) -> Manifest:
    path = Path(workdir_path) / FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise WorkdirError(
            f"{workdir_path} holds no trained ensemble (no {FILE}); train one with "
            "`sisa train CONFIG --workdir ...` or SisaEnsemble.from_config(...).fit(...)"
        ) from None
    hit = _cache.get(str(path))
    if hit is not None and hit[0] == data:
        return _own(hit[1])
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkdirError(f"{path} is corrupt ({e})", path=str(path)) from None
    m = from_dict(doc, str(path))
    _remember(path, data, m)
    return _own(m)


def write(path: Path, m: Manifest) -> None:
    """Commit ``m`` to ``path`` (atomic and durable: the model swap)."""
    data = encode(m)
    write_atomic(path, data)
    _remember(Path(path), data, _own(m))


def encode(m: Manifest) -> bytes:
    """Compact JSON with sorted keys, as ``json.dumps(m.to_dict(), sort_keys=True, separators=(",", ":"))``
    writes it (`ShardState.to_json` keeps each shard's part); ``indent`` would route json through its
    pure-Python encoder, 5x slower at S=64."""
    top = m._top()
    before = {k: v for k, v in top.items() if k < "shards"}
    after = {k: v for k, v in top.items() if k > "shards"}
    parts = [json.dumps(before, sort_keys=True, separators=(",", ":"))[:-1]] if before else ["{"]
    parts.append(("," if before else "") + '"shards":[' + ",".join(sh.to_json() for sh in m.shards) + "]")
    parts.append(("," + json.dumps(after, sort_keys=True, separators=(",", ":"))[1:]) if after else "}")
    return "".join(parts).encode()
