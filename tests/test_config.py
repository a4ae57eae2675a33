"""The config schema: defaults are filled, bad values are refused with the key named."""

import copy
from pathlib import Path

import pytest
import yaml

from convviz.config import ConfigError, dataset_settings, train_settings, validate_config

ROOT = Path(__file__).resolve().parent.parent


def default_config() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def overlay(base: dict, extra: dict) -> dict:
    """Snakemake's --configfile merge: nested dicts update recursively, other values replace."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = overlay(out[key], value)
        else:
            out[key] = value
    return out


def test_default_and_smoke_configs_are_valid():
    validate_config(default_config())
    validate_config(overlay(default_config(), yaml.safe_load((ROOT / "configs/smoke.yaml").read_text())))


def test_missing_keys_are_filled_from_schema_defaults():
    config = validate_config({})
    assert config["data"]["dataset"] == "synthetic"
    assert config["data"]["synthetic"]["classes"] >= 10
    assert config["train"]["checkpoint_epochs"] == [1, 2, 5, 10, 20, 30, 40, 64]
    assert config["models"] == ["lenet", "alexnet", "zfnet", "resnet50"]


@pytest.mark.parametrize(
    "change, key",
    [
        ({"train": {"epochs": -1}}, "train.epochs"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"per_model": {"lenet": {"epochs": -3}}}}, "train.per_model.lenet.epochs"),
        ({"train": {"per_model": {"vgg": {"epochs": 3}}}}, "train.per_model"),
        ({"train": {"per_model": {"resnet50": {"optimizer": "adam"}}}}, "train.per_model.resnet50.optimizer"),
        ({"train": {"checkpoint_epochs": []}}, "train.checkpoint_epochs"),
        ({"models": ["lenet", "vgg16"]}, "models.1"),
        ({"data": {"dataset": "mnist"}}, "data.dataset"),
        ({"data": {"image_size": 8}}, "data.image_size"),
        ({"data": {"dataset": "caltech101"}}, "data.root"),
        ({"data": {"synthetic": {"scale_range": [0.9, 0.5]}}}, "data.synthetic.scale_range"),
        ({"device": "tpu"}, "device"),
        ({"tarin": {}}, "tarin"),
        ({"architecture": {"zfnet": {"fc_widht": 3}}}, "architecture.zfnet"),
        ({"occlusion": {"size": 65}}, "occlusion.size"),
        ({"correspondence": {"occluder_size": 200}}, "correspondence.occluder_size"),
    ],
)
def test_bad_value_is_refused_naming_its_key(change, key):
    with pytest.raises(ConfigError) as err:
        validate_config(overlay(default_config(), change))
    assert f"'{key}'" in str(err.value) or key in str(err.value)


def test_checkpoint_epochs_are_cut_to_the_epochs_run_and_keep_the_last():
    config = validate_config(overlay(default_config(), {"train": {"per_model": {"lenet": {"epochs": 7}}}}))
    assert train_settings(config, "lenet")["checkpoint_epochs"] == [1, 2, 5, 7]


def test_per_model_override_changes_only_that_model():
    base = validate_config(default_config())
    edited = validate_config(overlay(default_config(), {"train": {"per_model": {"lenet": {"epochs": 3}}}}))
    assert train_settings(base, "lenet") != train_settings(edited, "lenet")
    for model in ("alexnet", "zfnet", "resnet50"):
        assert train_settings(base, model) == train_settings(edited, model)


def test_target_settings_do_not_touch_the_source_dataset():
    base = validate_config(default_config())
    edited = validate_config(overlay(default_config(), {"data": {"synthetic": {"target_train_per_class": 7}}}))
    assert dataset_settings(base) == dataset_settings(edited)


def test_schema_model_names_match_the_registry():
    from convviz.models.registry import MODELS

    schema = yaml.safe_load((ROOT / "schemas/config.schema.yaml").read_text())
    assert schema["properties"]["models"]["items"]["enum"] == list(MODELS)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"top9": {"project_maps": 0}}, "config key 'top9.project_maps': 0 is not allowed; expected 'all' or an integer >= 1"),
        ({"evolution": {"images": 0}}, "config key 'evolution.images': 0 is not allowed; expected 'all' or an integer >= 1"),
        ({"top9": {"layers": "conv5"}},
         "config key 'top9.layers': 'conv5' is not allowed; expected 'all' or a non-empty list of strings without repeats"),
    ],
)
def test_a_value_of_neither_allowed_form_is_told_both_forms(change, message):
    """Keys taking a number or "all" (or a list or "all") say so, not "not valid under any of the
    given schemas"."""
    with pytest.raises(ConfigError) as err:
        validate_config(overlay(default_config(), change))
    assert message in str(err.value)


def test_layers_can_be_chosen_per_model():
    """top9/evolution layers: a mapping picks layers per model (models left out get all); a
    model outside the run or a layer a model lacks is named with its key."""
    from convviz.top9 import analysis_layers

    layers = {"alexnet": ["conv1", "conv2", "conv5"], "resnet50": ["conv1", "layer4"]}
    config = validate_config(overlay(default_config(), {"top9": {"layers": layers}, "evolution": {"layers": layers}}))
    chosen = {model: analysis_layers(model, config["top9"]["layers"]) for model in config["models"]}
    assert chosen["alexnet"] == ["conv1", "conv2", "conv5"] and chosen["resnet50"] == ["conv1", "layer4"]
    assert chosen["lenet"] == ["conv1", "conv2", "fc3", "fc4"]  # left out: all
    for change, message in [
        ({"top9": {"layers": {"vgg": "all"}}}, "config key 'top9.layers': ['vgg'] are not among the models"),
        ({"evolution": {"layers": {"lenet": ["conv5"]}}}, "config key 'evolution.layers.lenet': unknown layer(s) ['conv5'] for lenet"),
        ({"top9": {"layers": ["conv5"]}}, "(a list applies to every model; per model: {lenet: [...]})"),
    ]:
        with pytest.raises(ConfigError) as err:
            validate_config(overlay(default_config(), change))
        assert message in str(err.value)


# ------------------------------------------------------------- python -m convviz.config (overlay check)


def test_overlays_merge_as_snakemake_merges_configfiles():
    """merge_overlay gives what snakemake.utils.update_config (what --configfile uses) gives,
    including a mapping replacing a scalar and a scalar replacing a mapping."""
    from snakemake.utils import update_config

    from convviz.config import merge_overlay

    base = {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": 3, "f": {"g": 1}}
    extra = {"a": {"c": {"d": [3], "x": None}, "y": 2}, "e": {"h": 1}, "f": 5, "z": "new"}
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    merge_overlay(ours, copy.deepcopy(extra))
    update_config(theirs, copy.deepcopy(extra))
    assert ours == theirs


def test_config_check_names_the_file_and_line_of_broken_yaml(tmp_path, capsys):
    """Snakemake says only "Config file is not valid JSON or YAML"; the check names the overlay,
    the line and the column."""
    from convviz.config import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("top9:\n  maps: [1, 2\n  bad: : :\n")
    assert main(["--base", str(ROOT / "config.yaml"), str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"config file {bad} is not valid YAML at line 3, column 6" in err


def test_config_check_reports_bad_keys_missing_files_and_accepts_the_smoke_overlay(tmp_path, capsys):
    from convviz.config import main

    base = str(ROOT / "config.yaml")
    assert main(["--base", base, str(ROOT / "configs/smoke.yaml")]) == 0
    assert "config ok" in capsys.readouterr().out

    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("top9:\n  project_maps: 0\n")
    assert main(["--base", base, str(wrong)]) == 1
    assert "config key 'top9.project_maps': 0 is not allowed; expected 'all' or an integer >= 1" in capsys.readouterr().err

    assert main(["--base", base, str(tmp_path / "missing.yaml")]) == 1
    assert f"cannot read config file {tmp_path / 'missing.yaml'}" in capsys.readouterr().err

    listed = tmp_path / "list.yaml"
    listed.write_text("- top9\n")
    assert main(["--base", base, str(listed)]) == 1
    assert "must hold a mapping of config keys, got a list" in capsys.readouterr().err


def test_synthetic_correspondence_class_and_parts_are_checked_before_any_job():
    """The synthetic classes and their parts are fixed by its designs, so a wrong correspondence
    class or part stops the config check (a real dataset's are checked by the job, from its
    parts.parquet); data.synthetic.classes widens the classes."""
    from convviz.data.synthetic import SOURCE_DESIGNS, TARGET_DESIGNS

    with pytest.raises(ConfigError, match=r"'correspondence.class_name': 'bird' is not a class of the synthetic dataset "
                       r"\(data.synthetic.classes: 10\); its classes are \['face', 'house'"):
        validate_config(overlay(default_config(), {"correspondence": {"class_name": "bird"}}))
    with pytest.raises(ConfigError, match=r"'correspondence.parts': \['tail'\] are not parts of the synthetic class "
                       r"'face'; its parts are \['left_eye', 'right_eye', 'nose', 'mouth'\]"):
        validate_config(overlay(default_config(), {"correspondence": {"parts": ["left_eye", "tail"]}}))
    validate_config(overlay(default_config(), {"data": {"synthetic": {"classes": len(SOURCE_DESIGNS)}},
                                               "correspondence": {"class_name": "bird", "parts": ["beak"]}}))
    # a real dataset's classes are unknown until it is read
    validate_config(overlay(default_config(), {"data": {"dataset": "imagefolder", "root": "/data/x"},
                                               "correspondence": {"class_name": "dog", "parts": ["ear"]}}))
    # the schema's limits are the number of designs the generator has
    for key, count in (("classes", len(SOURCE_DESIGNS)), ("target_classes", len(TARGET_DESIGNS))):
        validate_config(overlay(default_config(), {"data": {"synthetic": {key: count}}}))
        with pytest.raises(ConfigError, match=rf"'data.synthetic.{key}': {count + 1} is greater than the maximum of {count}"):
            validate_config(overlay(default_config(), {"data": {"synthetic": {key: count + 1}}}))
