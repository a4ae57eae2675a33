"""Same seed, same tables: a second run of the smoke config (on CPU) reproduces every Parquet
table of one model's studies exactly, except wall-clock columns; another seed changes them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from conftest import copy_workflow, snakemake

pytestmark = pytest.mark.workflow
MODEL = "lenet"


def timeless(df: pd.DataFrame) -> pd.DataFrame:
    """The table without wall-clock columns (seconds a step took differ from run to run)."""
    return df.drop(columns=[c for c in df.columns if "seconds" in c or c in ("time", "duration")])


def model_tables(root: Path) -> list[Path]:
    """Every Parquet table of the dataset and of MODEL's training and studies, relative to root."""
    found = [p.relative_to(root) for p in (root / "results").rglob("*.parquet")]
    return sorted(p for p in found if f"/{MODEL}/" in f"/{p}" or p.parts[1] == "data")


def test_same_seed_gives_identical_tables_and_another_seed_does_not(smoke_run, tmp_path):
    tables = model_tables(smoke_run)
    studies = {p.parts[1] for p in tables}
    assert {"data", "models", "top9", "evolution"} <= studies, studies
    again = copy_workflow(tmp_path / "again")
    snakemake(again, *map(str, tables), "--cores", "2", "--configfile", "configs/smoke.yaml")
    for table in tables:
        pd.testing.assert_frame_equal(
            timeless(pd.read_parquet(again / table)), timeless(pd.read_parquet(smoke_run / table)), check_exact=True, obj=str(table)
        )
    other = copy_workflow(tmp_path / "other")
    history = f"results/models/{MODEL}/history.parquet"
    snakemake(other, history, "--cores", "2", "--configfile", "configs/smoke.yaml", "--config", "seed=1")
    assert not timeless(pd.read_parquet(other / history)).equals(timeless(pd.read_parquet(smoke_run / history)))
