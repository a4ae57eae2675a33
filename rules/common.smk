# Helpers shared by the rules: config validation, per-step settings, path builders.
import glob
import os
import sys

sys.path.insert(0, workflow.basedir)

from snakemake.utils import validate

from convviz.config import (
    architecture_settings,
    dataset_settings,
    target_settings,
    study_settings,
    train_settings,
    transfer_settings,
    transfer_targets,
    validate_config,
)
from convviz.machine import local_gpus

# Our own check first: every problem at once, each naming its key. Then Snakemake's validate().
validate_config(config, workflow.source_path("../schemas/config.schema.yaml"))
validate(config, "../schemas/config.schema.yaml")

MODELS = config["models"]
DATA = "results/data/source"
# Transfer targets enabled in config (transfer.targets.<name>.enabled).
TARGETS = transfer_targets(config)
ENV = "../envs/convviz.yaml"

# The GPU-able rules (train, top9, occlusion, transfer) claim one unit of the `gpu` resource when
# this machine shows a GPU device, 0 otherwise (CPU-only machines run them side by side).
# profiles/default offers one unit, so a workstation runs one GPU job at a time. The resource is
# scoped local: a cluster run does not count it when submitting (each job gets its own GPU), and
# profiles/slurm sets it to 1 for these rules, which the SLURM plugin turns into `--gpus=1`.
LOCAL_GPU = local_gpus()


resource_scopes:
    gpu="local",


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


# The report (rules/report.smk) reads every file behind the default target.
REPORT = "results/report/index.html"


def producing_job(target):
    """(rule, wildcards) of the job that writes `target`, or None for a source file."""
    producer = next((r for r in workflow.rules if r.name not in ("all", "report") and r.is_producer(target)), None)
    return None if producer is None else (producer, producer.get_wildcards(target))


def jobs_behind(targets):
    """Every output of the jobs that produce `targets`, and the benchmark file of every job they
    depend on (upstream jobs first, so timings read in DAG order).

    The report takes these as its inputs, so it reads only what this configuration's jobs wrote
    (never a leftover figure from an earlier config), and it reruns whenever one of them changes.
    """
    outputs, benchmarks, seen = [], [], set()

    def visit(producer, wildcards):
        key = (producer.name, tuple(sorted(wildcards.items())))
        if key in seen:
            return
        seen.add(key)
        try:
            inputs = producer.expand_input(wildcards)[0]
        except Exception:  # an input function that needs a finished checkpoint: no upstream timings
            inputs = []
        for f in inputs:
            upstream = producing_job(str(f))
            if upstream is not None:
                visit(*upstream)
        benchmark = producer.expand_benchmark(wildcards)
        if benchmark is not None:
            benchmarks.append(str(benchmark))

    for target in targets:
        if target == REPORT:
            continue
        job = producing_job(target)
        if job is None:  # a source file: the report reads it as it is
            outputs.append(target)
            continue
        outputs.extend(str(f) for f in job[0].expand_output(job[1])[0])
        visit(*job)
    return list(dict.fromkeys(outputs)), list(dict.fromkeys(benchmarks))


def report_inputs(wildcards):
    """Evaluated when the DAG is built, after every rules/*.smk has added to OUTPUTS."""
    outputs, benchmarks = jobs_behind(OUTPUTS)
    return {
        "outputs": outputs,
        "benchmarks": benchmarks,
        # The README's measured figures and the benchmarks/*.py results (made outside the
        # workflow, by `make benchmarks`) for the benchmarks section, where they exist.
        "readme": [p for p in ["README.md"] if os.path.exists(p)],
        "benchmark_results": sorted(glob.glob("results/benchmarks/*.json")),
    }
