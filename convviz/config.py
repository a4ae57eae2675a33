"""Config validation with messages that name the key, and the per-step views rules take as params.

Imported by the Snakefile, so it must not import torch (the Snakemake process may run without it).

Run as `python -m convviz.config [overlay.yaml ...]` it checks config.yaml with the overlays merged
on top as `snakemake --configfile` merges them, without starting Snakemake: a YAML syntax error is
reported with its file, line and column (Snakemake's own message names neither).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import jsonschema
import yaml

from convviz.layer_names import unknown_layer_problems

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"
REAL_DATASETS = ("imagefolder", "imagenet", "imagenette", "caltech101", "caltech256", "voc2012")


class ConfigError(ValueError):
    """A config value the user must fix; the message names every offending key."""


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _describe(error: jsonschema.ValidationError) -> str:
    """One line per problem: the dotted key, the bad value, and what is allowed."""
    key = _key(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        where = "at the top level" if not error.absolute_path else f"in '{key}'"
        names = ", ".join(f"'{_key([*error.absolute_path, name])}'" for name in extra)
        return f"config key {names}: unknown key {where}; allowed keys: {allowed}"
    if error.validator == "enum":
        return f"config key '{key}': {error.instance!r} is not one of the allowed values {error.validator_value}"
    if error.validator == "propertyNames":
        allowed = error.validator_value.get("enum")
        return f"config key '{key}': unknown name {error.instance!r}; allowed names: {allowed}"
    if error.validator == "type":
        return f"config key '{key}': {error.instance!r} is not of type {error.validator_value}"
    if error.validator in ("oneOf", "anyOf"):
        options = " or ".join(_in_words(option) for option in error.validator_value)
        return f"config key '{key}': {error.instance!r} is not allowed; expected {options}"
    allowed = {k: schema[k] for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems") if k in schema}
    hint = f" (allowed: {allowed})" if allowed else ""
    return f"config key '{key}': {error.message}{hint}"


def _in_words(schema: dict) -> str:
    """A schema alternative as a phrase: "'all'", "an integer >= 1", "a list of strings", ..."""
    if "enum" in schema:
        return " or ".join(repr(value) for value in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        item = schema.get("items", {}).get("type")
        words = ("a non-empty list" if schema.get("minItems") else "a list") + (f" of {item}s" if item else "")
        return words + (" without repeats" if schema.get("uniqueItems") else "")
    words = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
             "object": "a mapping", "null": "null"}.get(kind, f"a {kind}" if kind else "a value")
    for bound, sign in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if bound in schema:
            words += f" {sign} {schema[bound]}"
    return words


def _fill_defaults(instance: dict, schema: dict) -> None:
    """Recursively insert schema defaults for missing keys (objects first, then their members)."""
    if not isinstance(instance, dict) or schema.get("type") != "object":
        return
    for name, sub in schema.get("properties", {}).items():
        if name not in instance and "default" in sub:
            instance[name] = copy.deepcopy(sub["default"])
        if name in instance:
            _fill_defaults(instance[name], sub)


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    return yaml.safe_load(Path(path).read_text())


def validate_config(config: dict, schema_path: str | Path = SCHEMA_PATH) -> dict:
    """Fill defaults into ``config`` in place, check it, and return it.

    Raises ConfigError listing every problem (schema and cross-key checks) at once, so a user
    fixes their config in one go, before Snakemake schedules any job.
    """
    schema = load_schema(schema_path)
    _fill_defaults(config, schema)
    validator = jsonschema.Draft202012Validator(schema)
    problems = [_describe(e) for e in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))]
    if not problems:
        problems = _cross_checks(config)
    if problems:
        raise ConfigError("invalid convviz config:\n  - " + "\n  - ".join(problems))
    return config


def _cross_checks(config: dict) -> list[str]:
    """Checks a JSON schema cannot express."""
    problems = []
    data = config["data"]
    for target in transfer_targets(config):
        if target != "synthetic_target" and not config["transfer"]["targets"][target].get("root"):
            problems.append(
                f"config key 'transfer.targets.{target}.root': the enabled target {target!r} needs a root folder "
                "(where it lives, or where download: true should put it), or set enabled: false"
            )
    if data["dataset"] in REAL_DATASETS and not data.get("root"):
        problems.append(
            f"config key 'data.root': dataset {data['dataset']!r} needs a root folder "
            "(where it lives, or where download: true should put it)"
        )
    lo, hi = data["synthetic"]["scale_range"]
    if not lo < hi:
        problems.append(f"config key 'data.synthetic.scale_range': [{lo}, {hi}] must be increasing")
    top9 = config.get("top9", {})
    if isinstance(top9.get("figure_maps"), int) and isinstance(top9.get("project_maps"), int):
        if top9["figure_maps"] > top9["project_maps"]:
            problems.append(
                f"config key 'top9.figure_maps': {top9['figure_maps']} exceeds top9.project_maps "
                f"({top9['project_maps']}); the figure shows projected maps only: lower it or raise project_maps"
            )
    for section in ("top9", "evolution"):
        if section in config:
            layers = config[section].get("layers", "all")
            for model in config["models"]:
                problems.extend(unknown_layer_problems(f"{section}.layers", model, layers))
            if isinstance(layers, dict) and set(layers) - set(config["models"]):
                problems.append(
                    f"config key '{section}.layers': {sorted(set(layers) - set(config['models']))} are not among "
                    f"the models {config['models']}; give layers per model of the run"
                )
    evolution = config.get("evolution", {})
    if isinstance(evolution.get("maps_per_layer"), int) and isinstance(top9.get("project_maps"), int):
        if evolution["maps_per_layer"] > top9["project_maps"]:
            problems.append(
                f"config key 'evolution.maps_per_layer': {evolution['maps_per_layer']} exceeds top9.project_maps "
                f"({top9['project_maps']}); evolution follows maps that top9 projects: lower it or raise project_maps"
            )
    problems.extend(_sweep_and_mask_checks(config))
    # The occluder slides inside the image (Fig. 7): it cannot be larger than it.
    occlusion = config.get("occlusion", {})
    if occlusion.get("size", 0) > data["image_size"]:
        problems.append(
            f"config key 'occlusion.size': {occlusion['size']} px is larger than the images "
            f"(data.image_size {data['image_size']}); allowed: 1..{data['image_size']}"
        )
    mask = (config.get("correspondence") or {}).get("occluder_size")
    if mask is not None and mask > data["image_size"]:
        problems.append(
            f"config key 'correspondence.occluder_size': {mask} px is larger than the images "
            f"(data.image_size {data['image_size']}); allowed: 1..{data['image_size']}, or null for the part boxes' size"
        )
    for model in config["models"]:
        settings = train_settings(config, model)
        if settings["batch_size"] < 2 and settings["epochs"] > 0:
            problems.append(f"config key 'train.per_model.{model}.batch_size': BatchNorm models need batch_size >= 2")
        # The common list is the paper's and is cut to each model's run; an explicit per-model
        # list that names epochs the run never reaches is a mistake.
        own = config["train"].get("per_model", {}).get(model, {})
        beyond = sorted(e for e in own.get("checkpoint_epochs", []) if e > settings["epochs"])
        if beyond:
            problems.append(
                f"config key 'train.per_model.{model}.checkpoint_epochs': epochs {beyond} are beyond the "
                f"{settings['epochs']} epochs this model trains; allowed: 1..{settings['epochs']}"
            )
    return problems


def _sweep_and_mask_checks(config: dict) -> list[str]:
    """Invariance sweeps must go somewhere; correspondence parts must not take the control's names."""
    problems = []
    for transform in ("translation", "scale", "rotation"):
        lo, hi = config.get("invariance", {}).get(transform, {}).get("range", (0, 1))
        if not lo < hi:
            problems.append(f"config key 'invariance.{transform}.range': [{lo}, {hi}] must be increasing")
    reserved = sorted({"random", "object"} & set(config.get("correspondence", {}).get("parts", [])))
    if reserved:
        problems.append(
            f"config key 'correspondence.parts': {reserved} cannot be masked as parts ('random' names the "
            "control masks, 'object' is the whole object); use part names such as left_eye, right_eye, nose"
        )
    return problems or _synthetic_part_checks(config)


def _synthetic_part_checks(config: dict) -> list[str]:
    """On the synthetic dataset the classes and their parts are known before it is generated, so a
    wrong correspondence class or part is named now rather than when the correspondence jobs run
    (a real dataset's parts are checked then, from its parts.parquet)."""
    data, correspondence = config["data"], config.get("correspondence") or {}
    if data["dataset"] != "synthetic" or "class_name" not in correspondence:
        return []
    from convviz.data.synthetic import SOURCE_DESIGNS  # numpy/pandas/PIL only; imported when needed

    classes = data["synthetic"]["classes"]
    parts = {design.name: design.parts for design in SOURCE_DESIGNS[:classes]}
    name = correspondence["class_name"]
    if name not in parts:
        return [
            f"config key 'correspondence.class_name': {name!r} is not a class of the synthetic dataset "
            f"(data.synthetic.classes: {classes}); its classes are {list(parts)}"
        ]
    missing = [part for part in correspondence.get("parts", []) if part not in parts[name]]
    if missing:
        return [
            f"config key 'correspondence.parts': {missing} are not parts of the synthetic class {name!r}; "
            f"its parts are {list(parts[name])}"
        ]
    return []


def train_settings(config: dict, model: str) -> dict:
    """The training settings of one model: common `train` keys updated by `train.per_model[model]`.

    This plain dict is the train rule's params, so editing one model's override reruns only
    that model's training.
    """
    common = {k: v for k, v in config["train"].items() if k != "per_model"}
    common.update(config["train"].get("per_model", {}).get(model, {}))
    epochs = common["epochs"]
    # The paper's Fig. 4 epochs cut to the epochs run; the last epoch is always kept.
    kept = sorted({e for e in common["checkpoint_epochs"] if e <= epochs} | ({epochs} if epochs > 0 else set()))
    common["checkpoint_epochs"] = kept
    return common


def study_settings(config: dict, study: str, **extra) -> dict:
    """A study rule's params: its own config section plus the shared `analysis` settings, the
    seed and the device (plain types, so Snakemake reruns the study when any of them changes)."""
    settings = copy.deepcopy(config.get(study, {}))
    settings.update(analysis=copy.deepcopy(config["analysis"]), seed=config["seed"], device=config["device"])
    settings.update(extra)
    return settings


def architecture_settings(config: dict, model: str) -> dict:
    return dict(config.get("architecture", {}).get(model, {}))


def dataset_settings(config: dict) -> dict:
    """Exactly the settings that shape the source dataset (the dataset rule's params)."""
    data = config["data"]
    settings = {"dataset": data["dataset"], "image_size": data["image_size"], "seed": config["seed"]}
    if data["dataset"] == "synthetic":
        syn = data["synthetic"]
        settings.update(
            classes=syn["classes"],
            train_per_class=syn["train_per_class"],
            val_per_class=syn["val_per_class"],
            scale_range=list(syn["scale_range"]),
            rotation_deg=syn["rotation_deg"],
            distractors=syn["distractors"],
        )
    else:
        settings.update({k: data[k] for k in ("root", "download", "val_fraction", "max_per_class")})
    return settings


TRANSFER_TARGETS = ("synthetic_target", "caltech101", "caltech256", "voc2012")


def transfer_targets(config: dict) -> list[str]:
    """The enabled transfer targets (transfer.targets.<name>.enabled), in TRANSFER_TARGETS order."""
    targets = config.get("transfer", {}).get("targets", {})
    return [t for t in TRANSFER_TARGETS if targets.get(t, {}).get("enabled", t == "synthetic_target")]


def transfer_settings(config: dict, target: str, model: str | None = None) -> dict:
    """Rule transfer's params for one target (and model): the `transfer` section with `targets`
    replaced by that target's own settings and `scratch` updated by `scratch.per_model[model]`
    (so editing another target or another model's baseline reruns nothing here)."""
    settings = study_settings(config, "transfer")
    settings["target"] = dict(settings.pop("targets", {}).get(target, {}), name=target)
    scratch = dict(settings.get("scratch", {}))
    overrides = scratch.pop("per_model", {})
    if model is not None:
        scratch.update(overrides.get(model, {}))
    settings["scratch"] = scratch
    return settings


def target_settings(config: dict, target: str) -> dict:
    """Settings of a transfer target dataset (the target_dataset rule's params)."""
    if target not in TRANSFER_TARGETS:
        raise ConfigError(f"unknown transfer target {target!r}; available: {list(TRANSFER_TARGETS)}")
    if target != "synthetic_target":
        # Exported through convviz.data.real like a source dataset; the transfer protocol draws
        # its own random splits, so val_fraction only shapes the manifest's split column.
        own = config.get("transfer", {}).get("targets", {}).get(target, {})
        return {
            "dataset": target,
            "root": own.get("root"),
            "download": bool(own.get("download", False)),
            "image_size": config["data"]["image_size"],
            "seed": config["seed"],
            "val_fraction": config["data"]["val_fraction"],
            "max_per_class": own.get("max_per_class"),
        }
    syn = config["data"]["synthetic"]
    return {
        "dataset": "synthetic_target",
        "image_size": config["data"]["image_size"],
        "seed": config["seed"],
        "classes": syn["target_classes"],
        "train_per_class": syn["target_train_per_class"],
        "val_per_class": syn["target_val_per_class"],
        "scale_range": list(syn["scale_range"]),
        "rotation_deg": syn["rotation_deg"],
        "distractors": syn["distractors"],
    }


# ------------------------------------------------------------------------------------ command line


def read_yaml_mapping(path: str | Path) -> dict:
    """The mapping in YAML file `path`; ConfigError naming the file (and the line and column of a
    syntax error) otherwise. An empty file is an empty mapping."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of config keys, got a {type(data).__name__}")
    return data


def merge_overlay(config: dict, overlay: dict) -> dict:
    """`overlay` merged into `config` in place as Snakemake merges --configfile files
    (snakemake.utils.update_config): mappings key by key, recursively; anything else replaced."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            merge_overlay(config[key], value)
        else:
            config[key] = copy.deepcopy(value)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convviz.config",
        description="Check config.yaml with overlays merged on top (as snakemake --configfile does) "
        "before starting a run.",
    )
    parser.add_argument("overlays", nargs="*", help="YAML overlays, merged in order")
    parser.add_argument("--base", default="config.yaml", help="the workflow's own config (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        config = read_yaml_mapping(args.base)
        for overlay in args.overlays:
            merge_overlay(config, read_yaml_mapping(overlay))
        validate_config(config)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"config ok: {' + '.join([str(args.base), *args.overlays])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
