"""HTML building blocks for the report: escaping, embedded images, tables, a small Markdown subset.

Everything returns strings; images become `data:` URIs so the page is one self-contained file.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd


def esc(value) -> str:
    return html.escape(str(value), quote=True)


# ------------------------------------------------------------------------------------------- images


def png_bytes(image, colours: int | None = None) -> bytes:
    """PNG of a PIL image or an (H, W, 3) uint8 array; `colours` quantises to a palette (smaller)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image))
    if image.mode not in ("RGB", "L", "P"):
        image = image.convert("RGB")
    if colours and image.mode == "RGB":
        # Octree quantisation: 3-5x smaller than full colour and, unlike median cut, fast.
        image = image.quantize(colours, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_uri(path: str | Path, max_width: int) -> str:
    """A figure file as a PNG data URI, downscaled to `max_width` pixels and quantised to 256
    colours (matplotlib figures are mostly flat colour; the deconvnet tiles stay legible)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "P"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba).convert("RGB")
        else:
            img = img.convert("RGB")
    if img.width > max_width:
        img = img.resize((max_width, round(img.height * max_width / img.width)), Image.Resampling.LANCZOS)
    return data_uri(png_bytes(img, colours=256))


def img_tag(uri: str, alt: str, cls: str = "", width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    klass = f' class="{cls}"' if cls else ""
    return f'<img src="{uri}" alt="{esc(alt)}"{klass}{size} loading="lazy" decoding="async">'


def figure(uri: str, caption: str, alt: str | None = None) -> str:
    return f"<figure>{img_tag(uri, alt or caption)}<figcaption>{caption}</figcaption></figure>"


# ------------------------------------------------------------------------------------------- tables


def _cell(value) -> str:
    if isinstance(value, float):
        if np.isnan(value):
            return "—"
        return f"{value:.4g}"
    if value is None:
        return "—"
    return esc(value)


def table(df: pd.DataFrame, cls: str = "", raw_columns: tuple[str, ...] = ()) -> str:
    """An HTML table of `df` (index ignored). Columns in `raw_columns` hold HTML already."""
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    rows = []
    for record in df.itertuples(index=False):
        cells = (str(v) if c in raw_columns else _cell(v) for c, v in zip(df.columns, record))
        rows.append("<tr>" + "".join(f"<td>{v}</td>" for v in cells) + "</tr>")
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def mean_std(values, digits: int = 3) -> str:
    """'mean ± std' of a sample (std with ddof=1; a single value has no spread to show)."""
    values = np.asarray(list(values), dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return "—"
    if values.size == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


# ----------------------------------------------------------------------------------------- markdown


def _inline(text: str) -> str:
    text = esc(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"<em>\1</em>", text)
    # Links keep their text only: the report loads nothing from outside.
    return re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)


def _table_row(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def markdown(text: str) -> str:
    """The Markdown subset the README uses: headings, paragraphs, pipe tables, fenced code, lists."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            block = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                block.append(lines[i])
                i += 1
            out.append(f"<pre><code>{esc(chr(10).join(block))}</code></pre>")
            i += 1
        elif m := re.match(r"(#{1,6})\s+(.*)", line):
            level = min(len(m.group(1)) + 2, 6)  # README ## sits under the report's h2 sections
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif line.lstrip().startswith("|") and i + 1 < len(lines) and re.match(r"\s*\|[\s:|-]+\|?\s*$", lines[i + 1]):
            head = _table_row(line)
            i += 2
            body = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                body.append(_table_row(lines[i]))
                i += 1
            cells = "".join(f"<th>{_inline(c)}</th>" for c in head)
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
            out.append(f"<table><thead><tr>{cells}</tr></thead><tbody>{rows}</tbody></table>")
        elif re.match(r"\s*[-*]\s+", line):
            items = []
            while i < len(lines) and re.match(r"\s*[-*]\s+", lines[i]):
                item = re.sub(r"^\s*[-*]\s+", "", lines[i])
                i += 1
                while i < len(lines) and lines[i].startswith("  ") and lines[i].strip():
                    item += " " + lines[i].strip()
                    i += 1
                items.append(f"<li>{_inline(item)}</li>")
            out.append(f"<ul>{''.join(items)}</ul>")
        elif not line.strip():
            i += 1
        else:
            para = [line]
            i += 1
            while i < len(lines) and lines[i].strip() and not re.match(r"(#|```|\s*\||\s*[-*]\s)", lines[i]):
                para.append(lines[i])
                i += 1
            out.append(f"<p>{_inline(' '.join(p.strip() for p in para))}</p>")
    return "\n".join(out)


def markdown_sections(text: str, pattern: str) -> list[tuple[str, str]]:
    """(heading, body) of every `##`/`###` section of a Markdown file whose heading matches
    `pattern` (case-insensitive); a matching `##` section includes its `###` subsections."""
    found = []
    heading, level, body = None, 0, []
    for line in text.splitlines() + ["## (end)"]:
        m = re.match(r"(#{2,3})\s+(.*)", line)
        if m and (heading is None or len(m.group(1)) <= level):
            if heading is not None:
                found.append((heading, "\n".join(body).strip()))
            heading, level, body = None, 0, []
            if re.search(pattern, m.group(2), re.I):
                heading, level = m.group(2), len(m.group(1))
        elif heading is not None:
            body.append(line)
    return found
