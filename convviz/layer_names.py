"""Analysis layers of every registry model: name -> module path whose output is that feature map.

Kept free of torch so the Snakefile process can check layer names in a config before any job
runs; `convviz.models.registry` builds its ModelSpecs from this table (the one source of truth).
"""

from __future__ import annotations

ANALYSIS_LAYERS: dict[str, dict[str, str]] = {
    "lenet": {"conv1": "features.1", "conv2": "features.4", "fc3": "classifier.2", "fc4": "classifier.5"},
    "alexnet": {
        "conv1": "features.1",
        "conv2": "features.4",
        "conv3": "features.7",
        "conv4": "features.9",
        "conv5": "features.11",
        "fc6": "classifier.2",
        "fc7": "classifier.5",
    },
    "zfnet": {
        "conv1": "features.1",
        "conv2": "features.5",
        "conv3": "features.9",
        "conv4": "features.11",
        "conv5": "features.13",
        "fc6": "classifier.2",
        "fc7": "classifier.5",
    },
    "resnet50": {
        "conv1": "relu",
        "layer1": "layer1",
        "layer2": "layer2",
        "layer3": "layer3",
        "layer4": "layer4",
        "pool": "avgpool",
    },
}


def layers_for(key: str, model: str, layers) -> tuple[str, object]:
    """(config key, choice) of a config `layers` value for one model: the value is "all", a list of
    names, or a mapping model -> either (a model the mapping leaves out gets "all"), whose key
    then names the model."""
    if isinstance(layers, dict):
        return f"{key}.{model}", layers.get(model, "all")
    return key, layers


def unknown_layer_problems(key: str, model: str, layers) -> list[str]:
    """Config problems for layer names `model` does not have ("all"/None: none).

    key: the dotted config key, named in the message with the valid layers.
    """
    per_model = isinstance(layers, dict)
    key, layers = layers_for(key, model, layers)
    if layers in ("all", None) or model not in ANALYSIS_LAYERS:
        return []
    requested = [layers] if isinstance(layers, str) else list(layers)
    known = list(ANALYSIS_LAYERS[model])
    unknown = [layer for layer in requested if layer not in known]
    if not unknown:
        return []
    hint = "" if per_model else f" (a list applies to every model; per model: {{{model}: [...]}})"
    return [f"config key '{key}': unknown layer(s) {unknown} for {model}; valid layers are {known}{hint}"]
