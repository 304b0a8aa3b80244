from pathlib import Path

import pytest
import yaml

from tasks.common.config import (
    ConfigError,
    Params,
    apply_overrides,
    load_params,
    persist_overrides,
    validate,
)

from .conftest import ROOT


def test_project_params_load():
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    assert p.ingest.source == "builtin" and p.ingest.num_images >= 2000


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=-1", "train.lr must be greater than 0"),
        ("train.epochs=two", "train.epochs must be a valid integer"),
        ("train.lrr=0.1", "train.lrr: unknown key"),
        ("model.image.weights=3", "model.image.weights must be a valid string"),
        ("preprocess.test_fraction=0.95", "val_fraction + test_fraction must be < 1"),
        ("ingest.source=coco", "coco.images_dir"),
        ("train.device=tpu", "train.device"),
        ("model.text.pooling=attention", "model.text.pooling"),
        ("nosuchsection.x=1", "nosuchsection: unknown key"),
    ],
)
def test_errors_name_the_dotted_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_params(ROOT / "params.yaml", [override])
    assert message in str(err.value)


def test_every_error_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        validate({"train": {"lr": 0, "batch_size": 1}})
    assert "train.lr" in str(err.value) and "train.batch_size" in str(err.value)


def test_override_parses_yaml_values():
    data = apply_overrides({}, ["train.lr=0.5", "evaluate.ks=[1, 3]", "model.text.pretrained=null"])
    assert data == {
        "train": {"lr": 0.5},
        "evaluate": {"ks": [1, 3]},
        "model": {"text": {"pretrained": None}},
    }
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["train.lr"])


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not sections\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(bad)


def test_persist_overrides_keeps_comments_and_validates(tmp_path: Path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    persist_overrides(path, ["train.epochs=3"])
    text = path.read_text()
    assert "# The single source of settings" in text
    assert load_params(path).train.epochs == 3
    with pytest.raises(ConfigError):
        persist_overrides(path, ["train.epochs=-3"])
    assert load_params(path).train.epochs == 3  # a rejected override writes nothing


def test_params_hash_covers_exactly_the_training_sections():
    a = validate({})
    assert a.params_hash() == validate({}).params_hash()
    for changed in (
        {"train": {"seed": 1}},
        {"model": {"embed_dim": 64}},
        {"preprocess": {"max_length": 16}},
        {"ingest": {"num_images": 10}},
    ):
        assert a.params_hash() != validate(changed).params_hash(), changed
    # Settings after training do not change the model, so they do not change its hash.
    for same in ({"evaluate": {"ks": [1, 2]}}, {"export": {"opset": 19}}, {"infer": {"top_k": 2}}):
        assert a.params_hash() == validate(same).params_hash(), same


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, prefix + k + ".")
    return out


def test_every_dvc_params_key_exists_in_config():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    known = _keys(validate({}).model_dump())
    for name, stage in dvc["stages"].items():
        for key in stage.get("params", []):
            assert key in known, f"dvc.yaml stage {name} lists unknown param {key}"


def test_dvc_plots_point_at_params_paths():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    paths = validate({}).paths
    files = set()
    for plot in dvc["plots"]:
        if isinstance(plot, str):
            files.add(plot)
        else:
            (spec,) = plot.values()
            files |= set(spec["y"])
    assert files == {paths.train_history, paths.recall_plot, paths.figures}


PRESETS = sorted((ROOT / "presets").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads(preset: Path):
    p = load_params(preset)
    assert p.paths == load_params(ROOT / "params.yaml").paths


def test_seed_preset_is_the_notes_configuration():
    p = load_params(ROOT / "presets" / "seed-resnet50-bert.yaml")
    assert (p.model.image.backbone, p.model.image.weights) == ("resnet50", "IMAGENET1K_V2")
    assert p.model.text.pretrained == "bert-base-uncased" and p.model.text.hidden_size == 768
