"""The GPU rules, read from what Snakemake plans (`snakemake -n`): on a cluster (`--profile
profiles/slurm`, as the README says, or `--workflow-profile profiles/slurm`) the GPU-able rules
ask SLURM for one GPU and no other rule does; locally they claim the single `gpu` unit of
profiles/default only when the machine shows a GPU device, so at most one runs at a time there."""

import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, copy_workflow, snakemake
from convviz.machine import GPU_DEVICE_FILES

pytestmark = pytest.mark.workflow


def profile(name: str) -> dict:
    return yaml.safe_load((ROOT / "profiles" / name / "config.yaml").read_text())


def gpu_rules(name: str) -> set[str]:
    return {rule for rule, res in profile(name)["set-resources"].items() if "gpu" in res}


def gpu_able_rules() -> set[str]:
    """Rules whose resources claim the local GPU (rules/*.smk: gpu=LOCAL_GPU)."""
    found = set()
    for path in (ROOT / "rules").glob("*.smk"):
        for block in re.split(r"\n(?=rule \w+:)", path.read_text()):
            rule = re.match(r"rule (\w+):", block)
            if rule and "gpu=LOCAL_GPU" in block:
                found.add(rule.group(1))
    return found


def planned_gpus(workdir: Path, *args: str) -> dict[tuple[str, str], int]:
    """(rule, model) -> the `gpu` resource of every job `snakemake -n` plans (0 when unset)."""
    out = snakemake(workdir, "-n", "--configfile", "configs/smoke.yaml", *args).stdout
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        rule = re.match(r"(?:local)?rule (\w+):", block.strip())
        if not rule or rule.group(1) == "all":
            continue
        model = re.search(r"wildcards: .*?model=(\w+)", block)
        gpu = re.search(r"resources: .*\bgpu=(\d+)", block)
        jobs[(rule.group(1), model.group(1) if model else "")] = int(gpu.group(1)) if gpu else 0
    return jobs


def test_the_cluster_profile_names_the_rules_that_claim_the_local_gpu():
    assert gpu_rules("slurm") == gpu_able_rules() >= {"train", "top9", "occlusion", "transfer"}
    assert profile("default")["resources"] == ["gpu=1"]
    assert "set-resources" not in profile("default")  # it would override the cluster's under --profile
    assert profile("slurm")["executor"] == "slurm"
    assert {"runtime", "mem_mb"} <= set(profile("slurm")["default-resources"])


@pytest.mark.parametrize("flag", ["--profile", "--workflow-profile"])
def test_cluster_runs_ask_for_a_gpu_exactly_for_the_gpu_able_rules(tmp_path, flag):
    jobs = planned_gpus(copy_workflow(tmp_path / "wf"), flag, "profiles/slurm")
    wanted = gpu_rules("slurm")
    assert {rule for rule, _ in jobs} & wanted, jobs
    for (rule, model), gpu in jobs.items():
        assert gpu == (1 if rule in wanted else 0), f"{rule} {model}: gpu={gpu}"


def test_local_runs_claim_the_gpu_only_when_the_machine_shows_one(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    wanted = gpu_able_rules()
    here = int(any(Path(d).exists() for d in GPU_DEVICE_FILES))
    for (rule, model), gpu in planned_gpus(workdir).items():
        assert gpu == (here if rule in wanted else 0), f"{rule} {model}: gpu={gpu} on this machine"

    # The same workflow on a machine with a GPU: point the device check at a file that exists.
    fake_device = tmp_path / "nvidia0"
    fake_device.touch()
    machine = workdir / "convviz/machine.py"
    assert "/dev/nvidia0" in machine.read_text()
    machine.write_text(machine.read_text().replace("/dev/nvidia0", str(fake_device)))
    jobs = planned_gpus(workdir)
    assert {rule for rule, _ in jobs} & wanted, jobs
    for (rule, model), gpu in jobs.items():
        assert gpu == (1 if rule in wanted else 0), f"{rule} {model}: gpu={gpu} with a GPU"
