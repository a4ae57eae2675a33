"""The whole DAG on the smoke config, and Snakemake's rerun decisions after config edits."""

import re

import pandas as pd
import pytest

from conftest import copy_workflow, snakemake

pytestmark = pytest.mark.workflow
MODELS = ["lenet", "alexnet", "zfnet", "resnet50"]


def planned_jobs(workdir, *configfiles) -> list[tuple[str, str]]:
    """(rule, model-or-"") for every job `snakemake -n` would run."""
    out = snakemake(workdir, "-n", "--configfile", *configfiles).stdout
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        m = re.match(r"(?:local)?rule (\w+):", block.strip())
        if m:
            model = re.search(r"model=(\w+)", block)
            jobs.append((m.group(1), model.group(1) if model else ""))
    return jobs


def test_smoke_run_writes_every_output(smoke_run):
    manifest = pd.read_parquet(smoke_run / "results/data/source/manifest.parquet")
    assert set(manifest["split"]) == {"train", "val"}
    parts = pd.read_parquet(smoke_run / "results/data/source/parts.parquet")
    assert {"left_eye", "right_eye", "nose", "object"} <= set(parts["part"])
    target = pd.read_parquet(smoke_run / "results/data/targets/synthetic_target/manifest.parquet")
    assert not set(target["class_name"]) & set(manifest["class_name"])
    for model in MODELS:
        history = pd.read_parquet(smoke_run / f"results/models/{model}/history.parquet")
        assert list(history.columns) == ["epoch", "split", "loss", "top1", "top5", "lr", "seconds", "resumed_from_epoch"]
        assert sorted(history["epoch"].unique()) == [1, 2]
        assert (smoke_run / f"results/models/{model}/checkpoints/epoch_001.pt").exists()
        assert (smoke_run / f"results/models/{model}/checkpoints/epoch_002.pt").exists()
        assert (smoke_run / f"results/models/{model}/training_curves.png").stat().st_size > 10_000
        assert "done:" in (smoke_run / f"results/logs/train/{model}.log").read_text()


def test_nothing_reruns_after_a_complete_run(smoke_run):
    assert planned_jobs(smoke_run, "configs/smoke.yaml") == []


def test_editing_one_models_epochs_reruns_only_that_model(smoke_run):
    (smoke_run / "edit.yaml").write_text("train:\n  per_model:\n    zfnet: {epochs: 3}\n")
    jobs = planned_jobs(smoke_run, "configs/smoke.yaml", "edit.yaml")
    assert ("train", "zfnet") in jobs
    assert not [j for j in jobs if j[0] == "train" and j[1] != "zfnet"]
    assert not [j for j in jobs if j[0] in ("dataset", "target_dataset")]


def test_editing_the_target_dataset_reruns_no_training(smoke_run):
    (smoke_run / "edit.yaml").write_text("data:\n  synthetic:\n    target_train_per_class: 5\n")
    jobs = planned_jobs(smoke_run, "configs/smoke.yaml", "edit.yaml")
    # The report shows every dataset, so it is rebuilt too; the transfer study reads the target.
    transfer = ("transfer_features", "transfer", "transfer_summary")
    assert sorted({j[0] for j in jobs if j[0] not in ("all", "report", *transfer)}) == ["target_dataset"]


def test_bad_config_stops_before_any_job(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "bad.yaml").write_text("train:\n  per_model:\n    lenet: {epochs: -2}\n")
    proc = snakemake(workdir, "--cores", "1", "--configfile", "bad.yaml", check=False)
    assert proc.returncode != 0
    assert "train.per_model.lenet.epochs" in proc.stdout + proc.stderr
    assert not (workdir / "results").exists()


def test_editing_one_study_reruns_only_that_study_and_the_report(smoke_run):
    (smoke_run / "edit.yaml").write_text("top9:\n  figure_maps: 3\n")
    jobs = planned_jobs(smoke_run, "configs/smoke.yaml", "edit.yaml")
    assert sorted(j for j in jobs if j[0] == "top9") == [("top9", m) for m in sorted(MODELS)]
    # compare shows the first layers' top-9 side by side, so it follows top9
    assert {j[0] for j in jobs} <= {"top9", "compare", "report", "all"}
