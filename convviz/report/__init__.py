"""The report: one self-contained HTML page laid out like the paper, built from the workflow's outputs.

`build_report` is the report rule's one call. Figures are embedded as PNG data URIs, style and
script are inline, nothing is loaded from outside: the file works offline and when copied.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from convviz.report.html import esc
from convviz.report.inputs import ReportInputs
from convviz.report.sections import SECTIONS, Context, unit_data_blocks

ASSETS = Path(__file__).resolve().parent / "assets"
PACKAGES = ("snakemake", "torch", "torchvision", "numpy", "pandas", "pyarrow", "matplotlib", "seaborn", "pillow", "scipy")

__all__ = ["build_report", "ReportInputs", "software_versions"]


def software_versions(repo: Path | None = None) -> dict[str, str]:
    """Python, the pinned packages, the machine and (in a git checkout) the commit."""
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
        cpu = names[0] if names else cpu
    versions["CPU"] = f"{cpu or 'unknown'} ({os.cpu_count()} logical cores)"
    try:
        import torch

        versions["GPU"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:  # torch missing or CUDA broken: the report still says what it knows
        versions["GPU"] = "unknown"
    if repo is not None:
        try:
            commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
            if commit.returncode == 0:
                versions["convviz commit"] = commit.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return versions


def build_report(
    inputs: ReportInputs,
    config: dict,
    out: str | os.PathLike,
    *,
    software: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Write the report page to `out` (atomically) and return {"sections": [ids rendered],
    "absent": [ids left out], "bytes": size}."""
    from convviz.io import atomic_path

    start = time.perf_counter()
    settings = config["report"]
    ctx = Context(inputs=inputs, config=config, settings=settings, software=software or software_versions(), log=log)
    toc, body, rendered, absent = [], [], [], []
    for number, section in enumerate(SECTIONS, start=1):
        t0 = time.perf_counter()
        html = section.render(ctx)
        ref = f' <span class="ref">{esc(section.paper_ref)}</span>' if section.paper_ref else ""
        heading = f"{number}. {esc(section.title)}"
        if html is None:
            absent.append(section.id)
            toc.append(f'<li class="absent"><a href="#{section.id}">{heading}</a></li>')
            body.append(
                f'<section id="{section.id}" class="report-section absent"><h2>{heading}{ref}</h2>'
                f'<p class="note">Left out: {esc(section.absent_note)}.</p></section>'
            )
        else:
            rendered.append(section.id)
            toc.append(f'<li><a href="#{section.id}">{heading}</a></li>')
            body.append(f'<section id="{section.id}" class="report-section"><h2>{heading}{ref}</h2>{html}</section>')
        log(f"section {section.id}: {'rendered' if html is not None else 'left out'} in {time.perf_counter() - t0:.1f} s")
    units = unit_data_blocks(ctx) if "unit-browser-section" in rendered else ""
    page = (ASSETS / "page.html").read_text()
    replacements = {
        "STYLE": (ASSETS / "style.css").read_text(),
        "SCRIPT": (ASSETS / "browser.js").read_text(),
        "TOC": "".join(toc),
        "BODY": "".join(body),
        "UNITS": units,
        "MODELS": esc(", ".join(inputs.models)),
        "DATASET": esc(config.get("data", {}).get("dataset", "")),
        "GENERATED": esc(time.strftime("%Y-%m-%d %H:%M")),
    }
    # One pass, so text inside a section that looks like a placeholder stays as it is.
    page = re.sub(r"\{\{([A-Z]+)\}\}", lambda m: replacements[m.group(1)], page)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    size = Path(out).stat().st_size
    log(f"done: {len(rendered)} sections, {len(absent)} left out ({', '.join(absent) or 'none'}), "
        f"{size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s -> {out}")
    return {"sections": rendered, "absent": absent, "bytes": size}
