"""The report's page: plain HTML with one CSS block, no JavaScript and no external URL, so that the folder
opens from any disk, offline, and a copy of it is the whole report."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import pandas as pd

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1d2329; max-width: 1180px; margin: 0 auto; padding: 0 1.5em 3em; }
header { border-bottom: 2px solid #1f4e79; margin-bottom: 1em; }
h1 { color: #1f4e79; margin-bottom: .2em; }
h2 { color: #1f4e79; border-bottom: 1px solid #c8d3de; padding-bottom: .15em; margin-top: 2em; }
h3 { margin: 1.4em 0 .4em; }
nav ol { columns: 2; padding-left: 1.4em; }
a { color: #1f4e79; }
code { font-size: 90%; background: #f0f3f6; padding: 0 .25em; border-radius: 3px; overflow-wrap: anywhere; }
table.data { border-collapse: collapse; margin: .6em 0 1em; font-size: 13px; }
.table { overflow-x: auto; }
table.data { font-variant-numeric: tabular-nums; }
table.data th, table.data td { border: 1px solid #c8d3de; padding: .2em .6em; text-align: left; vertical-align: top;
                               white-space: nowrap; }
table.data .prose { white-space: normal; overflow-wrap: anywhere; display: inline-block; min-width: 14em; }
table.data th { background: #e8eef4; white-space: normal; }
.missing { background: #fff6e0; border-left: 4px solid #e0a800; padding: .4em .8em; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.figures figure { flex: 1 1 40%; max-width: 50%; }
figure { margin: .5em 0; }
figure img { max-width: 100%; border: 1px solid #e0e6ec; }
figcaption { font-size: 13px; color: #56616c; }
details { margin: .5em 0 1em; }
summary { cursor: pointer; color: #1f4e79; }
.meta { color: #56616c; font-size: 13px; }
"""


@dataclass
class Section:
    """One numbered section of the report: HTML fragments, and the sentences saying what input is missing."""

    key: str
    title: str
    parts: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    shown: int = 0          # fragments that show a result (not a heading, not a missing note)

    def add(self, fragment: str) -> None:
        self.parts.append(fragment)
        self.shown += 1

    def heading(self, text: str) -> None:
        self.parts.append(f"<h3>{escape(text)}</h3>")

    def explain(self, text: str) -> None:
        """A sentence on how to read what follows (not a result itself)."""
        self.parts.append(paragraph(text))

    def lack(self, what: str, producer: str) -> None:
        """Note that `what` is missing and which command (`producer`) writes it."""
        sentence = f"{what} is missing: {producer} writes it."
        self.missing.append(sentence)
        self.parts.append(f'<p class="missing">{code(sentence)}</p>')

    @property
    def status(self) -> str:
        return "missing" if not self.shown else "partial" if self.missing else "present"


class Figures:
    """PNG figures copied under ``<root>/figures/`` and referenced by relative path, so the report folder
    holds every figure it shows, beside the HTML."""

    def __init__(self, root: Path):
        self.root = root
        self.paths: list[str] = []

    def figure(self, source: Path, name: str, caption: str) -> str:
        """Copy `source` to ``figures/<name>`` and return the <figure> that shows it."""
        target = self.root / "figures" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        src = target.relative_to(self.root).as_posix()
        self.paths.append(src)
        return (f'<figure><img src="{escape(src)}" alt="{escape(caption)}">'
                f"<figcaption>{escape(caption)}</figcaption></figure>")


def table(frame: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as an HTML table (scrolling sideways when wider than the page); floats with `digits`
    significant digits, missing values as –. Cells do not wrap, except long text (over 40 characters),
    so that numbers such as 1.2e-08 stay whole."""
    cells = frame.rename(columns=lambda c: escape(str(c)).replace("_", "_<wbr>"))   # long field names may break
    for column in cells.columns:
        if not pd.api.types.is_numeric_dtype(cells[column]):
            cells[column] = cells[column].map(_cell)
    html = cells.to_html(classes="data", index=False, border=0, na_rep="–", escape=False,
                         float_format=lambda x: f"{x:.{digits}g}")
    return f'<div class="table">{html}</div>'


def _cell(value):
    if not isinstance(value, str):
        return value
    return f'<span class="prose">{escape(value)}</span>' if len(value) > 40 else escape(value)


def figures(fragments: list[str]) -> str:
    return f'<div class="figures">{"".join(fragments)}</div>'


def code(text: str) -> str:
    """Escaped text whose `backticked` commands and paths show as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text))


def paragraph(text: str) -> str:
    return f"<p>{code(text)}</p>"


def collapsed(summary: str, fragment: str) -> str:
    """A long table folded away (HTML's own <details>, no script)."""
    return f"<details><summary>{escape(summary)}</summary>{fragment}</details>"


def page(title: str, meta: str, sections: list[Section]) -> str:
    """The whole page: a table of contents, then the numbered sections; `meta` is HTML."""
    toc = "".join(f'<li><a href="#{s.key}">{escape(s.title)}</a></li>' for s in sections)
    body = "".join(f'<section id="{s.key}"><h2>{i}. {escape(s.title)}</h2>{"".join(s.parts)}</section>'
                   for i, s in enumerate(sections, start=1))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<style>{CSS}</style></head><body><header><h1>{escape(title)}</h1><p class="meta">{meta}</p></header>'
            f"<nav><ol>{toc}</ol></nav>{body}</body></html>\n")
