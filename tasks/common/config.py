"""params.yaml -> typed, validated config. The only place settings are read from.

Every default here (and in model/config.py) equals params.yaml, key by key; tests/test_config.py
checks it, and that params.yaml spells out every key. The one exception is model.text.vocab_size,
which train fills in. Presets (presets/*.yaml) are overlays: only the keys they change.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model.config import ModelConfig

DEFAULT_PARAMS = Path("params.yaml")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading `2e-05` (no dot) as a float, as YAML 1.2 and DVC's
    ruamel writer do: persisted overrides and presets then read back as the numbers they were."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """params.yaml (or an override) is invalid; the message names every offending dotted key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsParams(_Section):
    raw: str = "data/raw"
    quarantine: str = "reports/quarantine.jsonl"
    ingest_report: str = "reports/ingest.json"
    prepared: str = "data/prepared"
    features: str = "data/features"
    train: str = "models/train"
    # train's resumable checkpoints and torchrun's rank logs: not a DVC output, so a rerun of
    # the stage after a crash finds them (DVC deletes a stage's outputs before running it)
    train_state: str = "models/train-state"
    train_history: str = "reports/train_history.csv"
    metrics: str = "reports/metrics.json"
    recall_plot: str = "reports/recall_at_k.csv"
    figures: str = "reports/figures"
    onnx: str = "models/onnx"
    export_report: str = "reports/export.json"
    register_report: str = "reports/register.json"
    infer: str = "outputs/infer"
    # registry models downloaded by `xmodal infer` and the batch-inference flow, one folder per
    # tracking URI, model and version (git-ignored, not DVC-tracked)
    model_cache: str = ".xmodal/models"


class CocoSource(_Section):
    images_dir: str | None = None
    captions_json: str | None = None


class CsvSource(_Section):
    path: str | None = None
    image_root: str | None = None


class WebDatasetSource(_Section):
    urls: str | None = None


class IngestParams(_Section):
    source: Literal["builtin", "coco", "csv", "webdataset"] = "builtin"
    seed: int = 0
    num_images: int = Field(2000, ge=1)
    image_size: int = Field(96, ge=32, le=1024)
    captions_per_image: int = Field(5, ge=1, le=10)
    min_objects: int = Field(1, ge=1, le=6)
    max_objects: int = Field(3, ge=1, le=6)
    max_pixels: int = Field(89_478_485, ge=1)
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)
    workers: int = Field(0, ge=0)
    dask_address: str | None = None
    shard_samples: int = Field(1000, ge=1)
    shard_megabytes: int = Field(256, ge=1)
    coco: CocoSource = CocoSource()
    csv: CsvSource = CsvSource()
    webdataset: WebDatasetSource = WebDatasetSource()

    @model_validator(mode="after")
    def _check_source(self) -> IngestParams:
        if self.min_objects > self.max_objects:
            raise ValueError("min_objects must be <= max_objects")
        if self.source == "coco" and not (self.coco.images_dir and self.coco.captions_json):
            raise ValueError("source 'coco' needs coco.images_dir and coco.captions_json")
        if self.source == "csv" and not (self.csv.path and self.csv.image_root):
            raise ValueError("source 'csv' needs csv.path and csv.image_root")
        if self.source == "webdataset" and not self.webdataset.urls:
            raise ValueError("source 'webdataset' needs webdataset.urls")
        return self


class PreprocessParams(_Section):
    seed: int = 0
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    image_size: int = Field(64, ge=16, le=1024)
    max_length: int = Field(40, ge=4, le=512)
    # WordPiece vocabulary trained on the train captions when model.text.pretrained is not set.
    vocab_size: int = Field(1000, ge=50)
    shard_size: int = Field(1024, ge=1)
    workers: int = Field(0, ge=0)
    dask_address: str | None = None

    @model_validator(mode="after")
    def _check_fractions(self) -> PreprocessParams:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1")
        return self


class TemperatureParams(_Section):
    # learnable: CLIP's learned logit scale (clamped); fixed: held at model.init_temperature;
    # scheduled: cosine from `start` to `end` over training.
    mode: Literal["learnable", "fixed", "scheduled"] = "learnable"
    start: float = Field(0.1, gt=0.0, le=1.0)
    end: float = Field(0.05, gt=0.0, le=1.0)


class LossParams(_Section):
    # fixed: weights as given; uncertainty: learned (Kendall et al. 2018); schedule: auxiliary
    # losses ramp in linearly over ramp_epochs.
    weighting: Literal["fixed", "uncertainty", "schedule"] = "fixed"
    contrastive: float = Field(1.0, gt=0.0)
    itm: float = Field(1.0, ge=0.0)  # used when model.fusion.enabled
    multiscale: float = Field(0.5, ge=0.0)  # used when model.multiscale.enabled
    ramp_epochs: float = Field(2.0, ge=0.0)


class TowerOptim(_Section):
    lr: float | None = Field(None, gt=0.0)  # None: train.lr
    weight_decay: float | None = Field(None, ge=0.0)  # None: train.weight_decay
    # None trains every block; 0 freezes the tower; N trains only its last N blocks (LiT).
    trainable_blocks: int | None = Field(None, ge=0)


class ImageOptim(TowerOptim):
    lr: float | None = Field(3e-4, gt=0.0)


class TextOptim(TowerOptim):
    lr: float | None = Field(1e-4, gt=0.0)
    trainable_blocks: int | None = Field(2, ge=0)  # counts BERT embeddings + layers


class HeadsOptim(_Section):
    lr: float | None = Field(None, gt=0.0)
    weight_decay: float | None = Field(None, ge=0.0)


class AugmentParams(_Section):
    # Multi-scale RandomResizedCrop: area fraction range; None disables cropping.
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (0.75, 1.3333)
    hflip: bool = False

    @model_validator(mode="after")
    def _check_scale(self) -> AugmentParams:
        if self.crop_scale and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError("crop_scale must satisfy 0 < low <= high <= 1")
        return self


class DistributedParams(_Section):
    # More than one process (or node) makes the train stage launch itself under torchrun.
    nproc_per_node: int = Field(1, ge=1)
    nnodes: int = Field(1, ge=1)
    # Multi-node rendezvous (torchrun's c10d backend): every node runs the stage with the same
    # endpoint (host:port of one of them) and id. Unused on one node, which rendezvouses locally.
    rdzv_endpoint: str | None = None
    rdzv_id: str = "xmodal"
    # BatchNorm statistics over the global batch (SyncBatchNorm); CUDA only, as in PyTorch.
    sync_batchnorm: bool = True


class TrainParams(_Section):
    seed: int = 0
    epochs: int = Field(8, ge=1)
    # Optional cap on optimiser steps (tests, smoke runs); None trains for all epochs.
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    warmup_steps: int = Field(50, ge=0)
    grad_clip: float = Field(1.0, gt=0.0)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # Mixed precision: fp16 autocast + GradScaler on CUDA, bf16 autocast on CPU when set to "bf16".
    amp: Literal["auto", "off", "bf16"] = "auto"
    num_threads: int = Field(0, ge=0)
    # DataLoader worker processes; 0 reads batches in the training process. The batches do not
    # depend on it (tasks/common/loader.py), so it is not a DVC param of the train stage.
    workers: int = Field(1, ge=0)
    log_every: int = Field(10, ge=1)
    # Micro-batches per optimiser step (OpenCLIP's accum_freq): features of the whole batch are
    # cached, so the contrastive loss still sees train.batch_size pairs.
    accum_freq: int = Field(1, ge=1)
    # A resumable checkpoint every this many steps, and at each epoch's end (paths.train_state).
    checkpoint_every: int = Field(100, ge=1)
    # auto: continue from the latest checkpoint of the same params and data; never: start over.
    resume: Literal["auto", "never"] = "auto"
    # A non-finite loss stops training (naming the step), or, when true, skips that step.
    skip_nonfinite: bool = False
    channels_last: bool = False  # image batches and tower in channels-last memory format
    tf32: bool = True  # TF32 matmuls and convolutions on CUDA (Ampere and later)
    compile: bool = False  # torch.compile the model
    distributed: DistributedParams = DistributedParams()
    temperature: TemperatureParams = TemperatureParams()
    loss: LossParams = LossParams()
    image: ImageOptim = ImageOptim()
    text: TextOptim = TextOptim()
    heads: HeadsOptim = HeadsOptim()
    augment: AugmentParams = AugmentParams()

    @model_validator(mode="after")
    def _check_batch_split(self) -> TrainParams:
        d = self.distributed
        parts = d.nproc_per_node * d.nnodes * self.accum_freq
        if self.batch_size % parts:
            raise ValueError(
                f"batch_size ({self.batch_size}) must divide evenly into {parts} micro-batches "
                "(distributed.nproc_per_node x distributed.nnodes x accum_freq)"
            )
        if self.accum_freq > 1 and self.loss.weighting == "uncertainty":
            # Its regulariser (+ log variance) would be counted once per micro-batch.
            raise ValueError("accum_freq > 1 needs loss.weighting fixed or schedule")
        return self


# Train settings that cannot change the trained weights: left out of the train stage's DVC
# params and of the fingerprint a resumed run must match.
RUN_INVARIANT_TRAIN_KEYS = ("workers", "checkpoint_every", "resume")


class FeaturesParams(_Section):
    # Cache a frozen image tower's pooled output (train.image.trainable_blocks: 0) once per
    # image, so that training epochs run only the text side and the heads (LiT).
    enabled: bool = True
    batch_size: int = Field(64, ge=1)


class EvaluateParams(_Section):
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1)
    batch_size: int = Field(256, ge=1)
    # With model.fusion.enabled: re-rank each query's dual-encoder top rerank_k by ITM score.
    rerank_k: int = Field(10, ge=2)

    @model_validator(mode="after")
    def _check_ks(self) -> EvaluateParams:
        if any(k < 1 for k in self.ks):
            raise ValueError("ks must all be >= 1")
        return self


class Int8Params(_Section):
    # Mixed precision for the int8 image tower: its first k convs stay fp32, for the smallest even
    # k whose int8 embeddings of the validation images reach this mean cosine to fp32 (searched up
    # to max_fp32_convs). Measured on the default model: 0.992 kept R@1 within 1 point, 0.990 not
    # (docs/quantisation.md).
    min_cosine: float = Field(0.992, gt=0.0, le=1.0)
    max_fp32_convs: int = Field(16, ge=0)
    # Percentile calibration: activation ranges cover this percentile of the calibration images'
    # values (onnxruntime's default, 99.999). Lower clips more outliers and rounds the rest finer.
    percentile: float = Field(99.999, gt=50.0, le=100.0)


class ExportParams(_Section):
    opset: int = Field(18, ge=18)
    parity_atol: float = Field(1e-4, gt=0.0)
    parity_batch: int = Field(4, ge=2)
    # Built beside fp32 and scored on the test split: int8 (static QDQ image, dynamic text), fp16.
    variants: list[Literal["int8", "fp16"]] = Field(default_factory=lambda: ["int8"])
    calibration_images: int = Field(256, ge=1)  # train-split images for int8 static calibration
    int8: Int8Params = Int8Params()


class MlflowParams(_Section):
    # MLFLOW_TRACKING_URI in the environment takes precedence (servers, deployments).
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "xmodal"
    system_metrics: bool = True  # CPU/memory/disk/network (and GPU when present) during train
    system_metrics_interval: float = Field(10.0, gt=0)  # seconds between samples
    # A tracking server that does not answer: MLflow's HTTP retries (backoff doubling from
    # http_backoff seconds) and per-request timeout, then one line naming the server.
    http_retries: int = Field(3, ge=0, le=10)
    http_backoff: int = Field(2, ge=0, le=60)
    http_timeout: int = Field(60, gt=0)


class RegisterParams(_Section):
    model_name: str = Field("xmodal-dual-encoder", min_length=1)
    candidate_alias: str = "candidate"
    champion_alias: str = "champion"


class PromoteParams(_Section):
    # Gates, scoring the candidate (and the champion, when there is one) on the same test split
    # through ONNX Runtime: parity passed; not rolled back (unless forced); mean of i2t and t2i
    # R@1 >= min_mean_r1 (also for the first champion); mean R@1 > champion's + min_delta, an
    # exact tie passing only with on_tie=promote; no other R@K drops by more than tolerance.
    min_delta: float = Field(0.0, ge=-1.0, le=1.0)
    min_mean_r1: float = Field(0.6, ge=0.0, le=1.0)
    on_tie: Literal["refuse", "promote"] = "refuse"
    tolerance: float = Field(0.02, ge=0.0, le=1.0)
    previous_alias: str = "previous-champion"
    variant: Literal["fp32", "int8", "fp16"] = "fp32"
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1)


class InferParams(_Section):
    top_k: int = Field(5, ge=1)
    chunk_size: int = Field(256, ge=1)
    # "auto" uses CUDA when it actually initialises, else the CPU.
    provider: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0)
    variant: Literal["fp32", "int8", "fp16"] = "fp32"  # which exported variant serves
    # The demo queries `make run` ends with.
    queries: list[str] = Field(
        default_factory=lambda: [
            "a large red circle on the left",
            "a small blue square in the top right corner",
            "three shapes on a striped teal background",
        ]
    )


# pydantic warns that the stage name `register` shadows BaseModel.register (an ABC classmethod that
# nothing here uses); the section keeps the stage's name.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


# The params that decide the trained weights: the sections that ingest, preprocess and train read.
TRAINING_SECTIONS = ("ingest", "preprocess", "model", "features", "train")


class Params(_Section):
    paths: PathsParams = PathsParams()
    ingest: IngestParams = IngestParams()
    preprocess: PreprocessParams = PreprocessParams()
    model: ModelConfig = ModelConfig()
    features: FeaturesParams = FeaturesParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    mlflow: MlflowParams = MlflowParams()
    register: RegisterParams = RegisterParams()
    promote: PromoteParams = PromoteParams()
    infer: InferParams = InferParams()

    def params_hash(self) -> str:
        """The params hash: sha256 of the canonical JSON of the sections that decide the trained
        weights (TRAINING_SECTIONS). Train stores it in the checkpoint, export copies it into
        meta.json, and register tags the version with that stored value, so all three agree; a
        change to evaluate, export or register settings leaves it unchanged."""
        return _sha256({k: getattr(self, k).model_dump(mode="json") for k in TRAINING_SECTIONS})

    def resume_key(self) -> str:
        """params_hash without RUN_INVARIANT_TRAIN_KEYS: a checkpoint written under one resume
        key continues exactly under any params with the same key."""
        sections = {k: getattr(self, k).model_dump(mode="json") for k in TRAINING_SECTIONS}
        for key in RUN_INVARIANT_TRAIN_KEYS:
            del sections["train"][key]
        return _sha256(sections)


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        msg = msg.replace("Input should be ", "must be ")
        if isinstance(e.get("input"), dict):  # a whole section's own check: its message says it
            lines.append(f"{key}: {msg}")
        else:
            lines.append(f"{key} {msg} (got {e.get('input')!r})")
    return "invalid params:\n  " + "\n  ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=0.001' -> (['train', 'lr'], 0.001); the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value")
    return key.strip().split("."), load_yaml(raw)


# The pipeline's typed flow parameters (`prefect deployment run ... -p epochs=1`) and the params
# key each one sets; anything else goes through `overrides` as dotted `key=value` strings.
KEY_PARAMS = {
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "seed": "train.seed",
}


def key_overrides(overrides: list[str] | None, **values: Any) -> list[str]:
    """`overrides` followed by `train.epochs=1`-style items for each typed value that is set."""
    unknown = set(values) - set(KEY_PARAMS)
    if unknown:
        raise ConfigError(f"unknown flow parameter(s): {', '.join(sorted(unknown))}")
    typed = [f"{KEY_PARAMS[k]}={v}" for k, v in values.items() if v is not None]
    return [*(overrides or []), *typed]


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    data = copy.deepcopy(raw)
    for item in overrides or []:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def validate(raw: dict[str, Any]) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    return data


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1}: a dotted key for every leaf (non-mapping)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            out[key] = v
    return out


def schema_keys() -> set[str]:
    """Every dotted key the schema knows, sections included (`train`, `train.image`, ...)."""

    def walk(model: type[BaseModel], prefix: str) -> set[str]:
        keys = set()
        for name, field in model.model_fields.items():
            keys.add(prefix + name)
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                keys |= walk(sub, f"{prefix}{name}.")
        return keys

    return walk(Params, "")


def _yaml_value(value: Any) -> str:
    """A value as one line of YAML that reads back exactly (2e-05 -> 2.0e-05; 'null' quoted)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True)
    text = text.removesuffix("\n...\n").rstrip("\n")
    if isinstance(value, str) and load_yaml(text) != value:  # e.g. "2e-05", a float to us
        text = "'" + value.replace("'", "''") + "'"
    if "\n" in text or load_yaml(text) != value:
        raise ConfigError(f"cannot write {value!r} as a one-line override")
    return text


def preset_overrides(path: Path | str) -> list[str]:
    """A preset overlay (presets/*.yaml: only the keys it changes) as dotted `key=value` overrides,
    in file order, so it goes through the same path as -S (and is persisted like -S by
    `xmodal run`). Every key must exist in the schema; unknown ones are named."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"preset file not found: {path}")
    leaves = flatten(read_yaml(path))
    known = schema_keys()
    unknown = [k for k in leaves if k not in known]
    if unknown:
        raise ConfigError(f"preset {path}: unknown key(s): {', '.join(unknown)}")
    return [f"{key}={_yaml_value(value)}" for key, value in leaves.items()]


def expand_presets(
    presets: list[Path] | list[str] | None,
    overrides: list[str] | None = None,
    root: str | Path = ".",
) -> list[str]:
    """Each preset's overrides, in order, then `overrides` (so -S wins over -P). A relative
    preset path is taken from `root`, the project root."""
    paths = [Path(root) / p for p in map(Path, presets or [])]  # an absolute p stays itself
    items = [item for preset in paths for item in preset_overrides(preset)]
    return [*items, *(overrides or [])]


def load_params(
    path: Path = DEFAULT_PARAMS,
    overrides: list[str] | None = None,
    presets: list[Path] | None = None,
) -> Params:
    """Read params.yaml, lay each preset overlay over it in order, then the dotted-key overrides,
    and validate. Raises ConfigError before any work."""
    return validate(apply_overrides(read_yaml(path), expand_presets(presets, overrides)))


def persist_overrides(path: Path, overrides: list[str]) -> None:
    """Write overrides into params.yaml, as `dvc exp run -S` does, so dvc.lock records what ran.

    Uses DVC's own round-trip YAML writer, which keeps comments and key order.
    """
    from dvc.utils.serialize import modify_yaml

    load_params(path, overrides)  # validate first; never write a broken file
    with modify_yaml(path) as data:
        for item in overrides:
            keys, value = parse_override(item)
            node = data
            for k in keys[:-1]:
                if k not in node:
                    node[k] = {}
                node = node[k]
            node[keys[-1]] = value
