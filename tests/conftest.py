"""Shared fixtures: a tiny synthetic dataset, and a copy of the workflow to run Snakemake in."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# README.md: the report quotes its measured figures.
WORKFLOW_PARTS = ["Snakefile", "config.yaml", "rules", "scripts", "schemas", "envs", "report", "configs", "profiles", "convviz", "README.md"]


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    small convolutions run fastest on one thread, and far faster when other jobs share the 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """3 source classes x (10 train + 4 val) synthetic images at 64 px."""
    from convviz.data.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("tiny_data")
    generate_synthetic(out, seed=0, image_size=64, classes=3, train_per_class=10, val_per_class=4, log=lambda m: None)
    return out


def copy_workflow(dest: Path) -> Path:
    """A clean copy of the workflow (no results), so tests never touch the repo's results/."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in WORKFLOW_PARTS:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / part)
    return dest


def _without_scontrol() -> Path:
    """A folder whose ``scontrol`` fails at once, to put first on PATH for local runs.

    Importing Snakemake loads the SLURM executor plugin, which asks ``scontrol show config`` for
    MinJobAge. Where SLURM's client is installed but no controller runs (this machine between
    ``make test-slurm`` runs), that call waits 9 s, once per Snakemake process: more than the
    work of a dry run. Local runs never need the answer.
    """
    shim = Path(os.environ.get("TMPDIR", "/tmp")) / f"convviz-no-scontrol-{os.getuid()}"
    script = shim / "scontrol"
    if not script.exists():
        shim.mkdir(exist_ok=True)
        tmp = shim / f".scontrol.{os.getpid()}"
        tmp.write_text("#!/bin/sh\nexit 1\n")
        tmp.chmod(0o755)
        tmp.replace(script)
    return shim


def snakemake_env(slurm: bool = False) -> dict[str, str]:
    """The environment for a Snakemake process: unbuffered, and for local runs (``slurm`` false)
    a PATH whose ``scontrol`` fails fast."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not slurm:
        env["PATH"] = f"{_without_scontrol()}{os.pathsep}{env.get('PATH', '')}"
    return env


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the venv's Snakemake in ``workdir``; output captured for assertions.

    Runs that do not use the SLURM profile get a PATH whose ``scontrol`` fails fast (see
    ``_without_scontrol``)."""
    exe = Path(sys.executable).with_name("snakemake")
    env = snakemake_env(slurm=any("profiles/slurm" in a for a in args))
    proc = subprocess.run([str(exe), *args], cwd=workdir, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """The whole DAG on configs/smoke.yaml, run once per test session in a copy of the workflow.

    Every study's tests read their outputs from here (tests/test_<study>.py), so the DAG runs
    once however many files check it. Tests must not modify files under it.
    """
    workdir = copy_workflow(tmp_path_factory.mktemp("workflow"))
    snakemake(workdir, "--cores", "2", "--configfile", "configs/smoke.yaml")
    return workdir
