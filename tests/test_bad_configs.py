"""Bad configs stop Snakemake before any job starts, with a message naming the key and what is
allowed. Each case is a real `snakemake` run on a copy of the workflow with the bad overlay."""

from __future__ import annotations

import pytest
import yaml

from conftest import copy_workflow, snakemake

pytestmark = pytest.mark.workflow

# (overlay, the key the message must name, text showing what is allowed)
BAD_CONFIGS = [
    ({"train": {"epochs": "ten"}}, "train.epochs", "type"),
    ({"train": {"epochs": -1}}, "train.epochs", "minimum"),
    ({"train": {"lr": 0}}, "train.lr", "exclusiveMinimum"),
    ({"train": {"schedule": "linear"}}, "train.schedule", "['constant', 'step', 'cosine']"),
    ({"train": {"checkpoint_epochs": []}}, "train.checkpoint_epochs", "minItems"),
    ({"train": {"per_model": {"lenet": {"epochs": 3, "checkpoint_epochs": [1, 5]}}}}, "train.per_model.lenet.checkpoint_epochs", "allowed: 1..3"),
    ({"train": {"per_model": {"vgg16": {"epochs": 3}}}}, "train.per_model", "allowed values ['lenet'"),
    ({"models": ["lenet", "vgg16"]}, "models.1", "['lenet', 'alexnet', 'zfnet', 'resnet50']"),
    ({"models": []}, "models", "minItems"),
    ({"device": "tpu"}, "device", "['auto', 'cpu', 'cuda']"),
    ({"tarin": {"epochs": 3}}, "tarin", "allowed keys"),
    ({"data": {"dataset": "mnist"}}, "data.dataset", "imagefolder"),
    ({"data": {"dataset": "caltech101"}}, "data.root", "needs a root folder"),
    ({"data": {"image_size": 8}}, "data.image_size", "minimum"),
    ({"data": {"synthetic": {"train_per_class": -5}}}, "data.synthetic.train_per_class", "minimum"),
    ({"data": {"synthetic": {"scale_range": [0.9, 0.5]}}}, "data.synthetic.scale_range", "must be increasing"),
    ({"architecture": {"zfnet": {"fc_widht": 64}}}, "architecture.zfnet.fc_widht", "allowed keys"),
    ({"analysis": {"batch_size": 0}}, "analysis.batch_size", "minimum"),
    ({"top9": {"layers": ["conv1", "conv9"]}}, "top9.layers", "valid layers are"),
    ({"top9": {"project_maps": 4, "figure_maps": 16}}, "top9.figure_maps", "lower it or raise project_maps"),
    ({"evolution": {"maps_per_layer": 0}}, "evolution.maps_per_layer", "minimum"),
    ({"evolution": {"layers": ["fc7"]}, "models": ["lenet"]}, "evolution.layers", "valid layers are"),
    ({"occlusion": {"size": 100}}, "occlusion.size", "64"),
    ({"invariance": {"rotation": {"range": [90, 10]}}}, "invariance.rotation.range", "must be increasing"),
    ({"correspondence": {"parts": ["random"]}}, "correspondence.parts", "use part names"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("bad_configs"))


@pytest.mark.parametrize("overlay, key, allowed", BAD_CONFIGS, ids=[c[1] + "-" + str(i) for i, c in enumerate(BAD_CONFIGS)])
def test_bad_config_stops_snakemake_before_any_job_naming_the_key(workdir, overlay, key, allowed):
    (workdir / "bad.yaml").write_text(yaml.safe_dump(overlay))
    proc = snakemake(workdir, "--cores", "1", "--configfile", "configs/smoke.yaml", "bad.yaml", check=False)
    message = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"config key '{key}'" in message, message[-2000:]
    line = next(line for line in message.splitlines() if f"config key '{key}'" in line)
    assert allowed in line, line
    assert not (workdir / "results").exists(), "a job ran before the config was refused"


def test_there_are_at_least_twenty_distinct_bad_configs():
    assert len({yaml.safe_dump(c[0]) for c in BAD_CONFIGS}) >= 20
