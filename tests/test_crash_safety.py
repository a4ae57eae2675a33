"""An interrupted study job leaves nothing a later run would trust: killed mid-run (SIGKILL to
Snakemake and the job together, as a crash or an out-of-memory kill does), the next run plans the
job again, and the rerun completes it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import snakemake, snakemake_env
from convviz.layer_names import ANALYSIS_LAYERS

ZFNET_LAYERS = list(ANALYSIS_LAYERS["zfnet"])

pytestmark = pytest.mark.workflow


def test_a_study_job_killed_mid_run_is_rerun_not_trusted(smoke_run, tmp_path):
    workdir = tmp_path / "wf"
    shutil.copytree(smoke_run, workdir, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    target = "results/top9/zfnet/top9.parquet"
    log = workdir / "results/logs/top9/zfnet.log"
    log.unlink()
    exe = Path(sys.executable).with_name("snakemake")
    proc = subprocess.Popen(
        [str(exe), target, "--cores", "1", "--configfile", "configs/smoke.yaml", "--forcerun", "top9"],
        cwd=workdir,
        env=snakemake_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        # Kill once the job is half done: some layers projected, the tables not yet written.
        while time.time() < deadline and "conv2: projected" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.05)
        assert log.exists() and "conv2: projected" in log.read_text(), "the top9 job never got to its second layer"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    out = workdir / "results/top9/zfnet"
    assert not (out / "top9.parquet").exists() and not (out / "top9_arrays.npz").exists()
    shutil.rmtree(workdir / ".snakemake/locks", ignore_errors=True)  # a killed Snakemake leaves its lock
    dry = snakemake(workdir, target, "-n", "--configfile", "configs/smoke.yaml")
    assert re.search(r"(local)?rule top9:", dry.stdout), dry.stdout
    snakemake(workdir, target, "--cores", "1", "--configfile", "configs/smoke.yaml")
    assert (out / "top9.parquet").exists() and "per-image view" in log.read_text()
    assert sorted(p.name for p in (out / "figures").glob("*.png")) == sorted(f"{layer}.png" for layer in ZFNET_LAYERS)
