"""The paper's numbers (convviz.paper) for the report, and how the report prints them."""

from __future__ import annotations

from convviz.paper import TABLE1, TABLE4, TABLE5, TABLE6_MEAN_AP, TABLE7, TRANSFER_TABLES

__all__ = ["TABLE1", "TABLE4", "TABLE5", "TABLE6_MEAN_AP", "TABLE7", "TRANSFER_TABLES", "fmt"]


def fmt(value: tuple[float, float | None] | None, digits: int = 1) -> str:
    """'mean ± std' as the paper prints it, or an em dash where the paper has no number."""
    if value is None:
        return "—"
    mean, std = value
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"
