"""What each part of `kvstore-bench cluster` returns: a table to print and the same as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass
class PartResult:
    """One part's outcome. `rows` are the table's cells, already formatted; `data` holds the
    same figures unformatted (and more) for JSON; `notes` are lines printed under the table:
    the goal and whether it was met, what was compared with what."""

    part: str
    title: str
    columns: list[str]
    rows: list[list[str]]
    data: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"part": self.part, "title": self.title, "notes": self.notes, **self.data}


def print_part(result: PartResult, console: Console) -> None:
    table = Table(title=result.title)
    for index, column in enumerate(result.columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in result.rows:
        table.add_row(*row)
    console.print(table)
    for note in result.notes:
        console.print(f"  {note}")


def write_json(results: list[PartResult], path: Path, settings: dict[str, Any]) -> None:
    document = {"settings": settings, "parts": {r.part: r.to_json() for r in results}}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def percent(value: float) -> str:
    return f"{value:.2%}"


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"
