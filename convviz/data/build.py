"""The dataset rule's one entry point: synthetic or real, into the common on-disk form."""

from __future__ import annotations

from pathlib import Path


def build_dataset(settings: dict, out_dir: str | Path, log=print) -> dict:
    """Write images (synthetic) and manifest/parts/dataset.json under ``out_dir``; return the meta.

    ``settings`` is convviz.config.dataset_settings() or target_settings(): a plain dict.
    """
    settings = dict(settings)
    name = settings.pop("dataset")
    out_dir = Path(out_dir)
    if name in ("synthetic", "synthetic_target"):
        from convviz.data.synthetic import generate_synthetic

        return generate_synthetic(out_dir, target=name == "synthetic_target", log=log, **settings)
    from convviz.data.real import export_real_dataset

    out_dir.joinpath("images").mkdir(parents=True, exist_ok=True)  # real images stay where they are
    return export_real_dataset(name, out_dir, log=log, **settings)
