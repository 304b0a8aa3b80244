from pathlib import Path

import pytest
import yaml

from tasks.common.config import (
    ConfigError,
    Params,
    apply_overrides,
    flatten,
    load_params,
    load_yaml,
    persist_overrides,
    preset_overrides,
    read_yaml,
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


# -- one source: the code's defaults are params.yaml -------------------------------------------

# Train fills model.text.vocab_size in from the tokenizer; it is the one key params.yaml leaves out.
NOT_IN_PARAMS_YAML = {"model.text.vocab_size"}


def test_code_defaults_equal_params_yaml_key_by_key():
    code = flatten(Params().model_dump(mode="json"))
    raw = read_yaml(ROOT / "params.yaml")
    yaml_ = flatten(validate(raw).model_dump(mode="json"))
    differ = [
        f"{k}: code {code[k]!r} != params.yaml {yaml_[k]!r}" for k in code if code[k] != yaml_[k]
    ]
    assert not differ, "defaults disagree with params.yaml:\n  " + "\n  ".join(differ)


def test_params_yaml_spells_out_every_schema_key():
    schema = set(flatten(Params().model_dump(mode="json")))
    spelled = set(flatten(read_yaml(ROOT / "params.yaml")))
    missing = sorted(schema - spelled - NOT_IN_PARAMS_YAML)
    assert not missing, f"add to params.yaml: {', '.join(missing)}"
    assert not (NOT_IN_PARAMS_YAML & spelled), "vocab_size is filled in by train"


# -- presets: overlays on params.yaml ----------------------------------------------------------

PARAMS = ROOT / "params.yaml"
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))
preset_ids = [p.stem for p in PRESETS]


@pytest.mark.parametrize("preset", PRESETS, ids=preset_ids)
def test_every_preset_loads_onto_params_yaml(preset: Path):
    p = load_params(PARAMS, presets=[preset])
    assert p.paths == load_params(PARAMS).paths
    # The code's defaults are params.yaml, so the overlay alone means the same.
    assert validate(read_yaml(preset)) == p


@pytest.mark.parametrize("preset", PRESETS, ids=preset_ids)
def test_preset_lists_only_what_it_changes(preset: Path):
    base = flatten(load_params(PARAMS).model_dump(mode="json"))
    merged = flatten(load_params(PARAMS, presets=[preset]).model_dump(mode="json"))
    same = [k for k in flatten(read_yaml(preset)) if merged[k] == base[k]]
    assert not same, f"{preset.name} restates params.yaml at: {', '.join(same)}"


@pytest.mark.parametrize("variants", ["builtin", "real"])
def test_every_ablation_variant_loads(variants: str):
    # bench/ablation.py runs each row as overrides on params.yaml (the real rows on the
    # real-photo preset): a row the config refuses would fail only hours into a run.
    from bench.ablation import SETS

    presets = [ROOT / "presets" / "real-photos.yaml"] if variants == "real" else []
    for sets in SETS[variants].values():
        load_params(PARAMS, overrides=sets, presets=presets)
    # One that the config refuses says why in one line, without dumping the section.
    with pytest.raises(ConfigError) as err:
        load_params(PARAMS, overrides=["model.embed_dim=512", "model.projection.heads=3"])
    assert str(err.value).splitlines()[1:] == [
        "  model: embed_dim 512 is not a multiple of projection.heads 3"
    ]


def test_seed_preset_is_the_notes_configuration():
    p = load_params(PARAMS, presets=[ROOT / "presets" / "seed-resnet50-bert.yaml"])
    assert (p.model.image.backbone, p.model.image.weights) == ("resnet50", "IMAGENET1K_V2")
    assert p.model.text.pretrained == "bert-base-uncased" and p.model.text.hidden_size == 768
    assert p.train.text.lr == 2e-05 and p.train.text.trainable_blocks is None


def test_scratch_preset_is_the_former_default():
    p = load_params(PARAMS, presets=[ROOT / "presets" / "scratch-resnet18-bert2.yaml"])
    assert (p.model.image.backbone, p.model.image.weights) == ("resnet18", "none")
    assert p.model.text.pretrained is None and p.model.text.num_layers == 2
    assert p.train.image.lr is None and p.train.text.trainable_blocks is None


def test_unknown_preset_key_is_rejected_by_dotted_name(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lrr: 0.1\n  text:\n    lr: 0.1\nmodel:\n  text:\n    nope: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\): train\.lrr, model\.text\.nope"):
        load_params(PARAMS, presets=[bad])
    with pytest.raises(ConfigError) as err:
        load_params(PARAMS, presets=[tmp_path / "missing.yaml"])
    assert str(err.value) == f"preset file not found: {tmp_path / 'missing.yaml'}"


def test_presets_apply_in_order_then_overrides_win(tmp_path: Path):
    seed = ROOT / "presets" / "seed-resnet50-bert.yaml"
    later = tmp_path / "later.yaml"
    later.write_text("train:\n  epochs: 3\n  text:\n    lr: 0.001\n")
    p = load_params(PARAMS, ["train.text.lr=0.5"], [seed, later])
    assert p.train.epochs == 3  # the later preset wins over the earlier
    assert p.train.text.lr == 0.5  # -S wins over every preset
    assert p.model.image.backbone == "resnet50" and p.train.batch_size == 128


@pytest.mark.parametrize(
    "value", [2e-05, 1.0e20, 0.0001, None, "null", "2e-05", "none", [0.6, 1.0], [], True, "a=b"]
)
def test_override_values_round_trip(value):
    """A preset value written as a `key=value` item reads back as the same value and type."""
    from tasks.common.config import _yaml_value

    (out,) = flatten(apply_overrides({}, [f"x.y={_yaml_value(value)}"])).values()
    assert out == value and type(out) is type(value)


@pytest.mark.parametrize("preset", PRESETS, ids=preset_ids)
def test_persisted_preset_round_trips_exactly(tmp_path: Path, preset: Path):
    """`xmodal run -P` writes the preset into params.yaml as -S items; what DVC then records and
    what later stages read is the preset, value for value (lists, nulls, 2e-05)."""
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS.read_text())
    persist_overrides(path, preset_overrides(preset))
    written = flatten(read_yaml(path))
    for key, value in flatten(read_yaml(preset)).items():
        assert written[key] == value and type(written[key]) is type(value), key
    assert load_params(path) == load_params(PARAMS, presets=[preset])
    assert "# The single source of settings" in path.read_text()


def test_yaml_reads_exponent_floats_without_a_dot():
    assert load_yaml("a: 2e-05\nb: '2e-05'\nc: 10") == {"a": 2e-05, "b": "2e-05", "c": 10}


def test_stage_main_takes_presets_then_overrides():
    from tasks.common.stage import main

    seed = ROOT / "presets" / "seed-resnet50-bert.yaml"
    argv = ["--params", str(PARAMS), "-P", str(seed), "-S", "train.epochs=2"]
    p = main("probe", lambda params, root: params, argv)
    assert p.model.image.backbone == "resnet50" and p.train.epochs == 2


def test_cli_run_rejects_a_bad_preset_before_running(tmp_path: Path):
    from typer.testing import CliRunner

    from cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  image:\n    backbon: resnet18\n")
    result = CliRunner().invoke(app, ["run", "--root", str(ROOT), "-P", str(bad)])
    assert result.exit_code == 2
    assert result.output == f"error: preset {bad}: unknown key(s): model.image.backbon\n"


def test_stage_main_reports_bad_params_in_one_line(capsys):
    from tasks.common import stage
    from tasks.common.config import ConfigError

    def never(params, root):
        raise AssertionError("the stage must not run on bad params")

    with pytest.raises(SystemExit) as exit_:
        stage.main("train", never, ["--params", str(PARAMS), "-S", "train.lr=-1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("stage train failed: ConfigError:") and "train.lr" in err, err
    with pytest.raises(ConfigError, match="train.lr"):
        stage.main("train", never, ["--params", str(PARAMS), "-S", "train.lr=-1", "--verbose"])


def test_stage_main_reports_a_missing_input_in_one_line(capsys, tmp_path):
    from tasks.common import stage

    def needs_data(params, root):
        raise FileNotFoundError(f"no manifest at {tmp_path}/raw: run the ingest stage first")

    with pytest.raises(SystemExit) as exit_:
        stage.main("preprocess", needs_data, ["--params", str(PARAMS)])
    assert exit_.value.code == 2
    assert "run the ingest stage first" in capsys.readouterr().err
