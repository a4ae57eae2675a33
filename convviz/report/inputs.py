"""What the report rule was given, sorted by study.

The report reads nothing but its declared inputs (every output of the jobs behind the default
target, and their benchmark files), so a figure from an earlier configuration can never appear.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ReportInputs:
    """Files sorted by `results/<study>/...`; `model_of` picks the model out of a path."""

    files: list[Path]
    models: list[str]
    benchmarks: list[Path] = field(default_factory=list)
    readme: Path | None = None
    benchmark_results: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        files = []
        for f in map(Path, self.files):
            files.append(f)
            # A study's directory output (e.g. results/top9/{model}/figures) is this run's too:
            # Snakemake empties it before its job reruns. Datasets and checkpoints stay folders.
            if f.is_dir() and self.study_of(f) not in ("data", "models"):
                files.extend(sorted(p for p in f.rglob("*") if p.is_file() and not p.name.startswith(".")))
        self.files = files
        self.benchmarks = [Path(f) for f in self.benchmarks]
        self.readme = Path(self.readme) if self.readme else None
        self.benchmark_results = [Path(f) for f in self.benchmark_results]

    @staticmethod
    def study_of(path: Path) -> str | None:
        parts = Path(path).parts
        return parts[1] if len(parts) > 2 and parts[0] == "results" else None

    def model_of(self, path: Path) -> str | None:
        """The model a path belongs to: the first path component that names a configured model."""
        for part in Path(path).parts[2:-1]:
            if part in self.models:
                return part
        return None

    def study(self, name: str, suffix: str | None = None, model: str | None = None) -> list[Path]:
        """Files of one study (optionally of one suffix and one model), in input order."""
        return [
            f
            for f in self.files
            if self.study_of(f) == name
            and (suffix is None or f.name.endswith(suffix))
            and (model is None or self.model_of(f) == model)
            and not f.is_dir()
        ]

    def find(self, name: str, filename: str, model: str | None = None) -> Path | None:
        """The one file called `filename` in a study (for one model), or None."""
        hits = [f for f in self.study(name, model=model) if f.name == filename]
        return hits[0] if hits else None

    def has(self, name: str) -> bool:
        return bool(self.study(name))
