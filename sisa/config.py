"""Typed config: frozen pydantic v2 models with extra="forbid", loaded from YAML, a dict or an object.

`validate_file` reports every problem at once, each with a hint (and "did you mean ..." for typos).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from shards.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SyntheticData(_Strict):
    n_samples: int = Field(4000, ge=10)
    n_features: int = Field(20, ge=2)
    n_informative: int = Field(10, ge=1)
    n_classes: int = Field(4, ge=2)
    class_sep: float = 1.0
    flip_y: float = Field(0.02, ge=0, le=1)


class BaseDataConfig(_Strict):
    """Base rows (`shards.base`): declared non-erasable, trained once into the start every shard shares. A
    file with the data section's id and label columns (the ids are optional: without them the rows cannot be
    named, so `delete` cannot even be asked to erase them)."""

    source: Literal["npz", "csv", "parquet"]
    path: str


class DataConfig(_Strict):
    source: Literal["digits", "synthetic", "npz", "csv", "parquet", "arrays"] = "arrays"
    path: str | None = None
    id_column: str = "id"
    label_column: str = "label"
    test_fraction: float = Field(0.2, ge=0, lt=1)
    # The model's output space: labels are the integers 0..num_classes-1. Inferred at fit when unset (the
    # largest label + 1) and then written into the workdir's config.yaml, so that a deletion never changes it.
    num_classes: int | None = Field(None, ge=1)
    # a column (CSV, Parquet, also streamed, or an array "risk" of an npz) holding each row's deletion prior:
    # a probability in [0, 1] or a class name of sharding.risk_classes (needs a deletion-aware placement)
    risk_column: str | None = None
    synthetic: SyntheticData = SyntheticData()
    # rows that are never erased (public, licensed or synthetic data you may keep): see BaseDataConfig
    base: BaseDataConfig | None = None

    @model_validator(mode="after")
    def _path_needed(self):
        if self.source in ("npz", "csv", "parquet") and not self.path:
            raise ValueError(
                f"data.source={self.source!r} needs data.path (a file inside the workdir or an absolute path you own)"
            )
        return self


class ShardingConfig(_Strict):
    shards: int = Field(5, ge=1, le=4096)
    slices: int = Field(4, ge=1, le=1024)
    # where `add` puts new rows: "canonical" (the shard, slice and rank their ids hash to; the ensemble then
    # equals fit(live rows)) or "append" (one more slice and stage at the end of each shard they land in)
    new_rows: Literal["canonical", "append"] = "canonical"
    # epochs of a stage appended by `add` (new_rows: append); None: the last stage's epochs of the schedule
    # (the paper's per-stage epochs). An appended stage trains on all of the shard's slices so far.
    append_epochs: int | None = Field(None, ge=1, le=10000)
    # deletion-aware placement (shards.partition.Placement): "uniform" (every row equally likely anywhere),
    # "late_slices" (rows with risk >= risk_threshold fill the last slice of each shard) or "isolated_shards"
    # (those rows go to the last isolated_shards shards, default max(1, shards // 4), of their own)
    placement: Literal["uniform", "late_slices", "isolated_shards"] = "uniform"
    risk_threshold: float = Field(0.1, gt=0, le=1)
    isolated_shards: int | None = Field(None, ge=1)
    # named risk classes -> probability, e.g. {churned: 0.3, active: 0.01}
    risk_classes: dict[str, float] | None = None

    @field_validator("risk_classes")
    @classmethod
    def _probabilities(cls, v):
        bad = {k: p for k, p in (v or {}).items() if not (0 <= p <= 1)}
        if bad:
            raise ValueError(f"risk_classes maps class names to probabilities in [0, 1]; not {bad}")
        return v

    @model_validator(mode="after")
    def _placement(self):
        if self.placement == "uniform":
            if self.isolated_shards is not None or self.risk_classes is not None:
                raise ValueError(
                    "isolated_shards and risk_classes need a deletion-aware placement: "
                    "set sharding.placement to late_slices or isolated_shards"
                )
            return self
        if self.new_rows == "append":
            raise ValueError(
                f"placement {self.placement!r} works with new_rows: canonical only, not append: an appended slice "
                "takes a whole batch at the end of its shards whatever the rows' priors, so the placement's layout "
                "(and compaction back to it) would not hold; use new_rows: canonical (the default: each new row goes "
                "where fit would put it by its prior) or placement: uniform to append"
            )
        if self.placement == "late_slices" and self.slices < 2:
            raise ValueError("placement late_slices needs sharding.slices >= 2 (likely rows fill the last slice)")
        if self.placement == "isolated_shards" and self.isolated_count() >= self.shards:
            raise ValueError(
                f"placement isolated_shards needs isolated_shards < shards ({self.isolated_count()} >= {self.shards})"
            )
        return self

    def isolated_count(self) -> int:
        return self.isolated_shards or max(1, self.shards // 4)


class InitConfig(_Strict):
    """A pretrained state dict every shard starts from (`shards.base`): a local path or an object-store URI
    (s3://..., with storage.options), loaded only after its sha256 matches, and with ``weights_only``."""

    uri: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")


class EncoderConfig(_Strict):
    """A user's frozen encoder (`shards.encoder`): a factory or nn.Module class by import path, called with
    ``input_shape`` when it takes it, and optionally a state dict for it (digest checked before loading,
    ``weights_only``). It maps a batch of rows to (batch, width) features; the model is the head on them."""

    module: str = Field(min_length=3)
    uri: str | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")

    @model_validator(mode="after")
    def _both(self):
        if (self.uri is None) != (self.sha256 is None):
            raise ValueError("model.encoder needs uri and sha256 together (the weights file and its sha256sum)")
        if ":" not in self.module and "." not in self.module:
            raise ValueError(f"model.encoder.module {self.module!r} is not an import path like 'pkg.mod:Encoder'")
        return self


class ModelConfig(_Strict):
    name: str = "mlp"
    kwargs: dict = Field(default_factory=dict)
    init: InitConfig | None = None
    # "base": the start's body (every layer but the last), frozen; or a user's module: shards train heads on
    # its features, computed once per row (shards.encoder)
    encoder: Literal["base"] | EncoderConfig | None = None

    @field_validator("kwargs")
    @classmethod
    def _no_num_classes(cls, v: dict) -> dict:
        if "num_classes" in v:
            raise ValueError(
                "the class count is no longer a model argument: move it to data.num_classes "
                f"(data: {{num_classes: {v['num_classes']}}}); sisa passes it to the module"
            )
        return v

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v in ("mlp", "cnn") or ":" in v or "." in v:
            return v
        hint = difflib.get_close_matches(v, ["mlp", "cnn"], n=1)
        raise ValueError(
            f"unknown model {v!r}; "
            + (f"did you mean {hint[0]!r}? " if hint else "")
            + "use 'mlp', 'cnn' or an import path 'pkg.module:LightningModuleClass'"
        )


class TrainingConfig(_Strict):
    epochs: int = Field(10, ge=1)
    schedule: Literal["paper", "uniform"] | list[int] = "paper"
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0)
    lr_gamma: float = Field(1.0, gt=0, le=1)
    threads: int = Field(1, ge=1)
    # epochs of the base stage (data.base or fit(base=...)), trained once; None: training.epochs
    base_epochs: int | None = Field(None, ge=1)
    # the training step of the built-in MLP: "fast" (shards.fast: no autograd, one flat optimizer update) or
    # "eager" (autograd and torch's optimizer); the same bits on the same machine (tests check it). Unset: a
    # new fit uses "fast" and writes it into the workdir's config.yaml; an existing workdir keeps the engine
    # its manifest records (older workdirs: "eager"). A workdir never mixes engines.
    engine: Literal["eager", "fast"] | None = None
    # "bf16-mixed": fp32 master weights and optimizer state, each layer's arithmetic in bfloat16 (the fast
    # engine's GEMMs, torch.autocast on the eager step, Lightning's plugin for users' modules). It changes the
    # bits (and accuracy slightly) but is exact within itself; a workdir never mixes precisions.
    precision: Literal["32-true", "bf16-mixed"] = "32-true"

    @field_validator("schedule")
    @classmethod
    def _positive(cls, v):
        if isinstance(v, list) and (not v or any(e < 0 for e in v)):
            raise ValueError("an explicit schedule is a non-empty list of epochs per stage, each >= 0")
        if isinstance(v, list) and v[-1] < 1:
            raise ValueError(
                f"the last stage of training.schedule has {v[-1]} epochs, but it is the only stage that trains on "
                "every slice: give it at least 1 epoch (earlier stages may have 0)"
            )
        return v


class AggregationConfig(_Strict):
    method: Literal["mean_proba", "majority_vote"] = "mean_proba"
    weights: list[float] | None = None


class ResourcesConfig(_Strict):
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)


class ClusterConfig(_Strict):
    executor: Literal["ray", "inprocess"] = "ray"
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    max_workers: int | None = Field(None, ge=1)
    max_retries: int = Field(3, ge=0)


class TrackingConfig(_Strict):
    enabled: bool = True
    uri: str | None = None
    experiment: str | None = None
    # PNG plots on a deletion's run (once per settled batch): drawing them costs more than the rest of a
    # small deletion's fixed cost, so they are off unless asked for; fits and other operations plot always
    deletion_plots: bool = False


class StorageConfig(_Strict):
    uri: str | None = None
    options: dict = Field(default_factory=dict)


class SisaConfig(_Strict):
    name: str = "sisa"
    seed: int = 0
    data: DataConfig = DataConfig()
    sharding: ShardingConfig = ShardingConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    aggregation: AggregationConfig = AggregationConfig()
    resources: ResourcesConfig = ResourcesConfig()
    cluster: ClusterConfig = ClusterConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()
    _classes_inferred: bool = PrivateAttr(False)  # data.num_classes was filled in by fit, not given

    @model_validator(mode="after")
    def _consistent(self):
        R, S = self.sharding.slices, self.sharding.shards
        if isinstance(self.training.schedule, list) and len(self.training.schedule) != R:
            raise ValueError(
                f"training.schedule has {len(self.training.schedule)} entries but sharding.slices is {R}; give one epoch count per slice"
            )
        if self.data.risk_column is not None and self.sharding.placement == "uniform":
            raise ValueError("data.risk_column needs sharding.placement late_slices or isolated_shards")
        w = self.aggregation.weights
        if w is not None and (len(w) != S or any(x < 0 for x in w) or sum(w) <= 0):
            raise ValueError(f"aggregation.weights needs {S} non-negative numbers (one per shard), not all zero")
        if self.model.encoder is not None:
            _check_encoder(self)
        return self

    def epochs_per_stage(self) -> tuple[int, ...]:
        """The paper's schedule gives each stage about 2e/(R+1) epochs, so total work is e epochs on the shard."""
        R, e, sched = self.sharding.slices, self.training.epochs, self.training.schedule
        if isinstance(sched, list):
            return tuple(sched)
        if sched == "uniform":
            return (e,) * R
        return (max(1, round(2 * e / (R + 1))),) * R

    def placement(self):
        """The row placement (`shards.partition.Placement`) of ``sharding.placement``."""
        from shards.partition import Placement

        sh = self.sharding
        return Placement(sh.placement, sh.risk_threshold, sh.isolated_count())

    def appended_stage_epochs(self) -> int:
        """Epochs of a stage that `add` appends (``sharding.new_rows: append``): ``sharding.append_epochs``,
        or the last stage's epochs of the schedule."""
        return self.sharding.append_epochs or self.epochs_per_stage()[-1]

    def with_num_classes(self, num_classes: int) -> SisaConfig:
        """This config with ``data.num_classes`` inferred from the data (fit writes it into the workdir's
        config.yaml). A later fit of the same config object infers it again."""
        cfg = self.model_copy(update={"data": self.data.model_copy(update={"num_classes": int(num_classes)})})
        cfg._classes_inferred = True
        return cfg

    def with_engine(self, engine: str) -> SisaConfig:
        """This config with ``training.engine`` set (fit resolves an unset engine to "fast")."""
        cfg = self.model_copy(update={"training": self.training.model_copy(update={"engine": engine})})
        cfg._classes_inferred = self._classes_inferred
        return cfg

    @property
    def given_num_classes(self) -> int | None:
        """``data.num_classes`` as the user gave it (None when unset or inferred by an earlier fit)."""
        return None if self._classes_inferred else self.data.num_classes

    def training_hash(self) -> str:
        """Hash of everything that changes the weights: two workdirs with equal hashes are comparable.
        ``data.num_classes`` is part of it once set (configs without it keep their old hash), and so is
        ``training.engine: fast`` (unset or "eager" is what older workdirs trained with)."""
        dump = self._stable_dump()
        keep = {k: dump[k] for k in ("seed", "sharding", "model", "training")}
        if self.data.num_classes is not None:
            keep["num_classes"] = self.data.num_classes
        return _hash(keep)

    def config_hash(self) -> str:
        return _hash(self._stable_dump())

    def _stable_dump(self) -> dict:
        """The config as JSON, without fields added since that are unset (so old hashes still match)."""
        dump = self.model_dump(mode="json")
        if dump["data"]["num_classes"] is None:
            del dump["data"]["num_classes"]
        if dump["sharding"]["new_rows"] == "canonical":
            del dump["sharding"]["new_rows"]
        if dump["training"]["engine"] in (None, "eager"):  # "eager" is what workdirs without it trained with
            del dump["training"]["engine"]
        if dump["training"]["precision"] == "32-true":  # absent when fp32: older hashes still match
            del dump["training"]["precision"]
        if dump["sharding"]["append_epochs"] is None:
            del dump["sharding"]["append_epochs"]
        defaults = {"placement": "uniform", "risk_threshold": 0.1, "isolated_shards": None, "risk_classes": None}
        for k, v in defaults.items():  # the deletion-aware placement: absent when uniform (old hashes match)
            if dump["sharding"][k] == v:
                del dump["sharding"][k]
        if dump["data"]["risk_column"] is None:
            del dump["data"]["risk_column"]
        for section, key in (("data", "base"), ("model", "init"), ("model", "encoder"), ("training", "base_epochs")):
            if dump[section][key] is None:  # the shared start (shards.base): absent when unused
                del dump[section][key]
        if not dump["tracking"]["deletion_plots"]:
            del dump["tracking"]["deletion_plots"]
        return dump


def _check_encoder(c: SisaConfig) -> None:
    """``model.encoder: base`` splits the built-in MLP into a frozen body and per-shard heads (`shards.encoder`)."""
    if c.model.name != "mlp" and isinstance(c.model.encoder, EncoderConfig):
        raise ValueError("model.encoder.module: the head on its features is the built-in MLP; set model.name: mlp")
    if c.model.encoder == "base" and (c.model.name != "mlp" or not c.model.kwargs.get("hidden", (128, 64))):
        raise ValueError(
            "model.encoder: base needs model.name: mlp with at least one hidden layer (model.kwargs.hidden): the "
            "frozen encoder is every layer of the start but the last, and each shard trains that last layer"
        )
    if c.sharding.new_rows == "append":
        raise ValueError("model.encoder works with sharding.new_rows: canonical only, not append")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _describe(errors) -> list[str]:
    out = []
    for err in errors:
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parent = _model_at(err["loc"][:-1])
            hint = difflib.get_close_matches(str(err["loc"][-1]), list(parent.model_fields) if parent else [], n=1)
            msg = "unknown key" + (
                f"; did you mean {hint[0]!r}?"
                if hint
                else f"; allowed: {', '.join(parent.model_fields) if parent else '?'}"
            )
        out.append(f"{loc}: {msg}")
    return out


def _model_at(loc) -> type[BaseModel] | None:
    model: type[BaseModel] = SisaConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def load_config(source) -> SisaConfig:
    """A path to YAML, a dict, or a SisaConfig; raises ConfigError listing every problem."""
    if isinstance(source, SisaConfig):
        return source
    origin = "config"
    if isinstance(source, (str, Path)):
        origin = str(source)
        try:
            source = yaml.safe_load(Path(source).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {origin} does not exist", problems=[f"{origin}: not found"]) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{origin} is not valid YAML: {e}", problems=[str(e)]) from None
    if not isinstance(source, dict):
        raise ConfigError(
            f"{origin}: a config is a mapping of sections, got {type(source).__name__}", problems=["not a mapping"]
        )
    try:
        return SisaConfig.model_validate(source)
    except ValidationError as e:
        problems = _describe(e.errors())
        raise ConfigError(
            f"{origin} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems), problems=problems
        ) from None


def dump_yaml(cfg: SisaConfig, redact: bool = False) -> str:
    """The config as YAML; ``redact`` masks credential-like values (for logging, never for the workdir copy)."""
    doc = cfg.model_dump(mode="json")
    return yaml.safe_dump(_redact(doc) if redact else doc, sort_keys=False)


_SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def _redact(obj):
    if isinstance(obj, dict):
        return {
            k: "***" if any(w in str(k).lower() for w in _SECRET_WORDS) and v else _redact(v) for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_redact(v) for v in obj]
    return obj
