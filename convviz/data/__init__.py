"""Datasets: every source (synthetic or real) becomes images + manifest.parquet (+ parts.parquet)."""

from convviz.data.common import (  # noqa: F401
    DatasetError,
    ImageDataset,
    load_image,
    read_dataset,
    write_dataset_tables,
)
