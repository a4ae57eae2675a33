"""The smoke DAG on a real SLURM cluster through profiles/slurm (snakemake-executor-plugin-slurm).

Every Snakemake job must become one `sbatch` job (counted with sacct, GPU-able rules holding a
GPU), every output of the local smoke run must appear, its tables must hold the same numbers, and
a training job that SLURM cancels or requeues partway must resume from its last epoch.

Needs a cluster; on this machine (root):
    bash tests/slurm/start-cluster.sh
    .venv/bin/python -m pytest -q -m slurm tests/test_slurm.py
Without one, every test here is skipped, saying so.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import WORKFLOW_PARTS, snakemake

pytestmark = pytest.mark.slurm
PROFILE = ["--profile", "profiles/slurm"]  # as the README says (profiles/default joins it)
# The plugin first polls 40 s after a submission (sensible on a busy cluster); the smoke jobs take
# seconds, so poll after 2 s. Everything else comes from the profile as a user would run it.
FAST_POLL = ["--slurm-init-seconds-before-status-checks", "2"]
# Wall-clock columns differ between any two runs; every other column must match.
TIMING_COLUMN = re.compile(r"(^|_)(seconds|elapsed|duration)($|_)")
PREEMPT_EPOCHS = 8


def cluster_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None when a cluster with accounting is up."""
    for tool in ("sbatch", "squeue", "sacct", "scontrol", "sinfo", "scancel"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    if subprocess.run(["scontrol", "ping"], capture_output=True).returncode != 0:
        return "slurmctld does not answer `scontrol ping`"
    if subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True).returncode != 0:
        return "`sacct` fails (no slurmdbd accounting)"
    states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.split()
    if not any(s.rstrip("*").startswith(("idle", "mixed", "allocated")) for s in states):
        return f"no node is up (sinfo says {states})"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed (pip install -r requirements.txt)"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    problem = cluster_problem()
    if problem:
        message = f"no SLURM cluster: {problem}; start one with `bash tests/slurm/start-cluster.sh`"
        if os.environ.get("CONVVIZ_REQUIRE_SLURM"):  # CI: a missing cluster is a failure
            pytest.fail(message)
        pytest.skip(message)


def run_id_of(log: str) -> str:
    match = re.search(r"SLURM run ID: (\S+)", log)
    assert match, f"no SLURM run ID in Snakemake's output; was the slurm executor used?\n{log[-3000:]}"
    return match.group(1)


def sacct_jobs(run_id: str, duplicates: bool = False, settle: int = 30) -> pd.DataFrame:
    """One row per SLURM job of a Snakemake run (jobs are named by the plugin's run ID); with
    ``duplicates``, one row per run of a job (a requeued job ran more than once)."""
    since = time.strftime("%Y-%m-%dT%H:%M", time.localtime(time.time() - 86400))
    out = subprocess.run(
        ["sacct", "-X", "-P", "-n", *(["-D"] if duplicates else []), "--name", run_id, "-S", since,
         "-o", "JobIDRaw,State,Comment,AllocTRES"],
        check=True, capture_output=True, text=True,
    ).stdout
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    jobs = pd.DataFrame(rows, columns=["job_id", "state", "comment", "alloc_tres"])
    # slurmdbd hears of a job's end (and its comment) shortly after squeue does: wait for that.
    if (jobs["comment"].eq("") | jobs["state"].isin(["PENDING", "RUNNING"])).any() and settle > 0:
        time.sleep(1)
        return sacct_jobs(run_id, duplicates, settle - 1)
    # The plugin's comment: rule_<rule>[_wildcards_<values>]
    parsed = jobs["comment"].str.extract(r"^rule_(?P<rule>\w+?)(?:_wildcards_(?P<wildcards>.*))?$")
    return pd.concat([jobs, parsed], axis=1)


def job_stats(log: str) -> Counter:
    """Snakemake's own count of the jobs it plans, per rule (the 'Job stats' table it prints)."""
    table = log.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    counts = Counter()
    for line in table.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("job", "total"):
            counts[parts[0]] = int(parts[1])
    return counts


def gpu_rules(workdir: Path) -> set[str]:
    """Rules to which profiles/slurm gives a GPU."""
    profile = yaml.safe_load((workdir / "profiles/slurm/config.yaml").read_text())
    return {rule for rule, res in profile["set-resources"].items() if int(res.get("gpu", 0)) > 0}


def output_files(workdir: Path) -> set[str]:
    """Every file under results/, relative, without SLURM's own logs (absent from a local run)."""
    results = workdir / "results"
    return {str(p.relative_to(workdir)) for p in results.rglob("*")
            if p.is_file() and not p.relative_to(results).as_posix().startswith("logs/slurm/")}


def copy_smoke_workflow(smoke_run: Path, dest: Path) -> Path:
    """The workflow exactly as the local smoke run used it (the repo may have changed since)."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in WORKFLOW_PARTS:
        src = smoke_run / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / part)
    return dest


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, smoke_run, tmp_path_factory, request):
    """`all` on the smoke config, every job submitted to SLURM, in a fresh copy of the workflow."""
    workdir = copy_smoke_workflow(smoke_run, tmp_path_factory.mktemp("slurm_workflow"))
    t0 = time.time()
    proc = snakemake(workdir, *PROFILE, "--configfile", "configs/smoke.yaml", *FAST_POLL)
    seconds = time.time() - t0
    log = proc.stdout + proc.stderr
    run = SimpleNamespace(workdir=workdir, log=log, seconds=seconds, planned=job_stats(log),
                          jobs=sacct_jobs(run_id_of(log)))
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nSLURM smoke run: {len(run.jobs)} sacct jobs ({dict(Counter(run.jobs['rule']))}), "
              f"{seconds:.0f} s wall clock")
    return run


def test_every_job_was_submitted_with_sbatch(slurm_run):
    # `all` only gathers inputs: Snakemake finishes it itself, it runs no code.
    expected = slurm_run.planned - Counter({"all": slurm_run.planned["all"]})
    assert sum(expected.values()) >= 10, f"the smoke DAG looks too small: {slurm_run.planned}"
    assert Counter(slurm_run.jobs["rule"]) == expected, slurm_run.jobs.to_string()
    assert set(slurm_run.jobs["state"]) == {"COMPLETED"}, slurm_run.jobs.to_string()
    ran_locally = set(re.findall(r"^localrule (\w+):", slurm_run.log, flags=re.M))
    assert ran_locally <= {"all"}


def test_gpu_able_rules_hold_a_gpu_and_the_others_do_not(slurm_run):
    wanted = gpu_rules(slurm_run.workdir)
    assert {"train", "top9"} <= wanted
    holds_gpu = slurm_run.jobs["alloc_tres"].str.contains(r"gres/gpu=1\b")
    for (_, job), gpu in zip(slurm_run.jobs.iterrows(), holds_gpu):
        assert gpu == (job["rule"] in wanted), f"{job['rule']} {job['wildcards']}: AllocTRES {job['alloc_tres']}"
    assert holds_gpu.any() and not holds_gpu.all()


def test_every_output_of_the_local_run_appears(slurm_run, smoke_run):
    missing = output_files(smoke_run) - output_files(slurm_run.workdir)
    assert not missing, f"the SLURM run lacks {sorted(missing)}"
    dry = snakemake(slurm_run.workdir, "-n", "--configfile", "configs/smoke.yaml").stdout
    assert "Nothing to be done" in dry, dry


def test_tables_match_the_local_run(slurm_run, smoke_run):
    tables = sorted((smoke_run / "results").rglob("*.parquet"))
    assert any("history.parquet" in str(t) for t in tables)
    for local_path in tables:
        name = str(local_path.relative_to(smoke_run))
        local, remote = pd.read_parquet(local_path), pd.read_parquet(slurm_run.workdir / name)
        assert list(remote.columns) == list(local.columns), name
        assert len(remote) == len(local), name
        for column in local.columns:
            if TIMING_COLUMN.search(column):
                continue
            a, b = local[column], remote[column]
            if pd.api.types.is_float_dtype(a):
                np.testing.assert_allclose(b.to_numpy(float), a.to_numpy(float), rtol=1e-5, atol=1e-6,
                                           equal_nan=True, err_msg=f"{name}: column {column}")
            else:
                assert b.astype(str).tolist() == a.astype(str).tolist(), f"{name}: column {column}"


def squeue_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


@pytest.mark.parametrize("preemption", ["scancel", "requeue"])
def test_training_killed_partway_resumes_from_its_last_epoch(preemption, slurm_cluster, smoke_run, tmp_path):
    """Kill a training job after its first epoch: with `scancel` (the job fails and Snakemake's
    retry submits a new one) or `scontrol requeue` (SLURM reruns the same job, as after a
    preemption). Either way training must resume from its last epoch, not restart."""
    workdir = copy_smoke_workflow(smoke_run, tmp_path / "wf")
    shutil.copytree(smoke_run / "results/data", workdir / "results/data")  # only training runs
    (workdir / "preempt.yaml").write_text(f"train:\n  per_model:\n    resnet50: {{epochs: {PREEMPT_EPOCHS}}}\n")
    model_dir = workdir / "results/models/resnet50"
    exe = Path(sys.executable).with_name("snakemake")
    log_path = tmp_path / "snakemake.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [str(exe), *PROFILE, "--configfile", "configs/smoke.yaml", "preempt.yaml", *FAST_POLL,
             "results/models/resnet50/final.pt"],
            cwd=workdir, stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.time() + 300
        while not (model_dir / "resume/last.pt").exists():  # written atomically after each epoch
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        # squeue, not sacct: accounting learns of a running job (and its comment) with a delay.
        queue = subprocess.run(["squeue", "-h", "--name", run_id_of(log_path.read_text()), "-o", "%i|%T|%k"],
                               check=True, capture_output=True, text=True).stdout.split()
        running = [line.split("|")[0] for line in queue
                   if line.endswith("|RUNNING|rule_train_wildcards_resnet50")]
        assert len(running) == 1, queue
        job_id = running[0]
        if preemption == "scancel":
            subprocess.run(["scancel", job_id], check=True)
        else:
            subprocess.run(["scontrol", "requeue", job_id], check=True)
            # SLURM holds a requeued job back for two minutes; release it now, as an admin could.
            while squeue_state(job_id) != "PENDING":
                assert time.time() < deadline, f"job {job_id} was not requeued: {squeue_state(job_id)}"
                time.sleep(0.2)
            subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now"], check=True)
        assert proc.wait(timeout=600) == 0, log_path.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()

    jobs = sacct_jobs(run_id_of(log_path.read_text()))
    assert set(jobs["rule"]) == {"train"}
    if preemption == "scancel":  # a failed job, then Snakemake's retry
        assert [state.split()[0] for state in jobs["state"]] == ["CANCELLED", "COMPLETED"], jobs.to_string()
    else:  # one job, run twice by SLURM
        assert list(jobs["state"]) == ["COMPLETED"], jobs.to_string()
        assert "REQUEUED" in sacct_jobs(run_id_of(log_path.read_text()), duplicates=True)["state"].tolist()

    history = pd.read_parquet(model_dir / "history.parquet")
    resumed_from = int(history["resumed_from_epoch"].max())
    assert resumed_from > 0, "training restarted from scratch"
    assert resumed_from < PREEMPT_EPOCHS, "the job was killed after training had finished"
    before = history[history["resumed_from_epoch"] == 0]
    after = history[history["resumed_from_epoch"] == resumed_from]
    assert sorted(set(before["epoch"])) == list(range(1, resumed_from + 1))
    assert sorted(set(after["epoch"])) == list(range(resumed_from + 1, PREEMPT_EPOCHS + 1))
    assert len(history) == 2 * PREEMPT_EPOCHS  # every epoch once per split: nothing trained twice
    train_log = (workdir / "results/logs/train/resnet50.log").read_text()
    assert f"resuming resnet50 from epoch {resumed_from} of {PREEMPT_EPOCHS}" in train_log
