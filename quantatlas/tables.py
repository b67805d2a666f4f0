"""The command line's tables: rich tables rendered as plain text (no colour, no box, no trailing
blanks), so a table reads the same in a terminal, a pipe, a log file and a test."""
from __future__ import annotations

from io import StringIO

from rich.console import Console
from rich.table import Table


def plain_table(*columns: tuple[str, str]) -> Table:
    """A table with these (header, justify) columns, justify `left` (names) or `right` (numbers).
    Cells never wrap: a long name widens its column instead of breaking a row in two."""
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for header, justify in columns:
        table.add_column(header, justify=justify, no_wrap=True)
    return table


def render(table: Table, width: int = 160) -> str:
    """The table as text lines `width` characters wide at most (columns shrink only past it). Cells are
    plain text: `[...]` in an arm or codec name is printed, not read as rich markup."""
    out = StringIO()
    Console(file=out, width=width, color_system=None, highlight=False, markup=False).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())
