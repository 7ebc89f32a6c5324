"""params.yaml handling: typed settings, presets, and dvc-exp-style overrides (`mapet params`)."""

from pathlib import Path

import pytest
import yaml

from mapet.cli import main
from mapet.engine.pretrain import PretrainSettings
from mapet.errors import MapetError
from mapet.params import build_settings, load_params, set_param

DOCUMENT = {
    "preset": None,
    "pretrain": {"epochs": 1, "warmup_epochs": 0.2, "lr": "1.5e-3", "betas": [0.9, 0.95]},
    "model": {"depth": 6, "embed_dim": 192},
    "presets": {"big": {"pretrain": {"epochs": 300}, "model": {"depth": 12}}},
}


def write(tmp_path, document=DOCUMENT):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_numbers_take_the_type_their_field_is_annotated_with():
    settings = build_settings("pretrain", DOCUMENT["pretrain"], PretrainSettings)
    assert settings.warmup_epochs == 0.2 and settings.lr == 1.5e-3 and settings.epochs == 1
    assert isinstance(settings.epochs, int) and settings.betas == [0.9, 0.95]


@pytest.mark.parametrize("values, message", [({"epochs": 1.5}, "pretrain.epochs must be a whole number"),
                                              ({"lr": "fast"}, "pretrain.lr must be a number"),
                                              ({"epoch": 3}, "unknown setting.*pretrain.epoch")])
def test_bad_settings_are_named(values, message):
    with pytest.raises(MapetError, match=message):
        build_settings("pretrain", values, PretrainSettings)


def test_preset_merges_over_the_defaults_mapping_by_mapping(tmp_path):
    params = load_params(write(tmp_path, {**DOCUMENT, "preset": "big"}))
    assert params["pretrain"] == {**DOCUMENT["pretrain"], "epochs": 300}
    assert params["model"] == {"depth": 12, "embed_dim": 192}
    assert load_params(write(tmp_path))["pretrain"]["epochs"] == 1


def test_unknown_preset_is_an_error_naming_the_file(tmp_path):
    path = write(tmp_path, {**DOCUMENT, "preset": "huge"})
    with pytest.raises(MapetError, match=r"params.yaml: preset 'huge' is not defined.*big"):
        load_params(path)


def test_override_sets_existing_fields_only(tmp_path):
    params = load_params(write(tmp_path))
    set_param(params, "pretrain.epochs=3")
    set_param(params, "model.depth=12")
    assert params["pretrain"]["epochs"] == 3 and params["model"]["depth"] == 12
    with pytest.raises(MapetError, match="has no field 'pretrain.epoch'"):
        set_param(params, "pretrain.epoch=3")
    with pytest.raises(MapetError, match="expected FIELD=VALUE"):
        set_param(params, "pretrain.epochs")


def test_params_command_writes_an_overridden_copy_and_refuses_a_bad_one(tmp_path, capsys):
    source = write(tmp_path)
    out = tmp_path / "run" / "params.yaml"
    assert main(["params", "--params", str(source), "--set", "pretrain.epochs=2", "--set", "preset=big",
                 "--out", str(out)]) == 0
    written = yaml.safe_load(out.read_text())
    assert written["pretrain"]["epochs"] == 2 and written["preset"] == "big"
    assert load_params(out)["pretrain"]["epochs"] == 300       # a preset wins over the defaults it names
    assert main(["params", "--params", str(source), "--set", "preset=huge", "--out", str(tmp_path / "bad.yaml")]) == 2
    assert not (tmp_path / "bad.yaml").exists() and "preset 'huge' is not defined" in capsys.readouterr().err
    assert main(["params", "--params", str(source), "--set", "model.depth=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"]["depth"] == 3 and "presets" not in shown


@pytest.mark.parametrize("section, field, value, message", [
    ("pretrain", "lr", -1, "pretrain.lr must be above 0, got -1"),
    ("tokenize", "batch_size", 0, "tokenize.batch_size must be above 0"),
    ("finetune", "label_smoothing", 1.5, "finetune.label_smoothing must be at most 1"),
    ("pretrain", "zero_stage", 7, "pretrain.zero_stage must be one of 0, 1, 2, got 7"),
    ("pretrain", "decode", "tpu", "pretrain.decode must be one of cpu, gpu"),
    ("model", "img_size", "big", "model.img_size must be a number, got 'big'"),
    ("model", "depth", 2.5, "model.depth must be a whole number, got 2.5"),
    ("tokenize", "batch_size", "many", "tokenize.batch_size must be a number, got 'many'"),
])
def test_a_value_out_of_range_is_refused_naming_file_and_field(tmp_path, capsys, section, field, value, message):
    document = yaml.safe_load((Path(__file__).parent.parent / "params.yaml").read_text())
    document[section][field] = value
    path = write(tmp_path, document)
    command = ["pretrain", "--data", str(tmp_path / "none")] if section == "model" else ["params"]
    assert main([*command, "--params", str(path)]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_a_file_that_is_not_yaml_is_refused_naming_it(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text("pretrain:\n  epochs: [1\n")
    assert main(["pretrain", "--params", str(path)]) == 2
    error = capsys.readouterr().err
    assert f"{path}: not valid YAML" in error and "Traceback" not in error


@pytest.mark.parametrize("command", [["validate", "--data"], ["tokenizer", "build", "--data"], ["tokenize", "--data"],
                                     ["pretrain", "--tokens"], ["finetune", "--backbone"], ["evaluate", "--model"],
                                     ["probe", "--backbone"], ["pictures", "--model"], ["export", "--model"],
                                     ["data", "import", "--source"], ["registry", "list", "--workspace"],
                                     ["weights", "import", "--from", "official-mapet",
                                                                      "--out", "x.safetensors"]])
def test_a_wrong_path_is_one_message_naming_it(tmp_path, capsys, command):
    wrong = tmp_path / "nowhere"
    argv = [*command, str(wrong)]
    if command[0] == "tokenize":
        argv += ["--codebook", str(wrong)]
    assert main([*argv, "--params", str(Path(__file__).parent.parent / "params.yaml")]) == 2
    error = capsys.readouterr().err
    assert str(wrong) in error and "Traceback" not in error
