# Helpers shared by the rules: config validation, per-step settings, path builders.
import sys

sys.path.insert(0, workflow.basedir)

from snakemake.utils import validate

from convviz.config import (
    architecture_settings,
    dataset_settings,
    target_settings,
    study_settings,
    train_settings,
    validate_config,
)

# Our own check first: every problem at once, each naming its key. Then Snakemake's validate().
validate_config(config, workflow.source_path("../schemas/config.schema.yaml"))
validate(config, "../schemas/config.schema.yaml")

MODELS = config["models"]
DATA = "results/data/source"
TARGETS = ["synthetic_target"]
ENV = "../envs/convviz.yaml"


wildcard_constraints:
    model="|".join(["lenet", "alexnet", "zfnet", "resnet50"]),
    target="|".join(TARGETS),


def lib(*modules):
    """Library files a rule's logic lives in: editing them reruns the rule (Snakemake tracks
    script files, not what they import)."""
    return [f"convviz/{m}" for m in modules]


# The default target's inputs. Each rules/*.smk appends what its rules produce for `all`
# (the report rule, last, consumes them too).
OUTPUTS = [
    f"{DATA}/manifest.parquet",
    *expand("results/data/targets/{target}/manifest.parquet", target=TARGETS),
    *expand("results/models/{model}/final.pt", model=MODELS),
    *expand("results/models/{model}/history.parquet", model=MODELS),
]


def all_outputs():
    return OUTPUTS
