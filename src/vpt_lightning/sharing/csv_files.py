"""CSV files in and out, safe for a file someone else made and for the spreadsheet that opens what we write.

- :func:`csv_text` writes rows (:func:`write_csv_atomic` to a file) with every text cell a spreadsheet would run
  as a formula (one that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return, OWASP's list for CSV
  injection) prefixed with a single quote, which spreadsheet tools show as text: a class name ``=HYPERLINK(...)``
  stays a name.
- :func:`csv_rows` reads a regular file (:mod:`vpt_lightning.sharing.regular_files`) as dicts, and turns the csv
module's
  errors (a field over its limit of 128 KiB, a NUL byte) into a ``ValueError`` naming the file and the line.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional, Sequence

from ..runs.atomic import write_bytes_atomic
from .regular_files import open_regular_file

#: what starts a formula in Excel, LibreOffice or Google Sheets (OWASP, "CSV Injection")
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
#: CSV files read here (a run's metrics, lists of images) larger than this are refused before reading
MAX_CSV_BYTES = 2**30


def spreadsheet_cell(value: Any) -> Any:
    """``value``, with a leading single quote when it is text that a spreadsheet would run as a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """``header`` and ``rows`` as CSV text, text cells escaped by :func:`spreadsheet_cell`.

    Lines end with ``\\r\\n`` (RFC 4180), so that a cell holding a carriage return is quoted as one holding a line
    feed is (the csv module quotes a cell only for the characters of its line end), and stays one cell."""
    handle = io.StringIO()
    writer = csv.writer(handle, lineterminator="\r\n")
    writer.writerow([spreadsheet_cell(c) for c in header])
    writer.writerows([spreadsheet_cell(c) for c in row] for row in rows)
    return handle.getvalue()


def write_csv_atomic(text: str, path: os.PathLike) -> None:
    """Write CSV text (from :func:`csv_text`) as UTF-8, atomically, its ``\\r\\n`` line ends as they are."""
    write_bytes_atomic(text.encode("utf-8"), Path(path))


def csv_rows(path: os.PathLike, max_bytes: int = MAX_CSV_BYTES, required: Optional[str] = None) -> Iterator[Dict]:
    """The rows of the CSV file ``path`` as dicts (``csv.DictReader``), read as they come; ``required``: a column
    the file must have. Errors name the file (and the line)."""
    with open_regular_file(path, max_bytes) as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
        reader = csv.DictReader(text)
        try:
            if required is not None and required not in (reader.fieldnames or []):
                raise ValueError(f"{str(Path(path))!r} has no {required!r} column (its columns: {reader.fieldnames})")
            yield from reader
        except (csv.Error, UnicodeDecodeError) as err:
            raise ValueError(f"{str(Path(path))!r}: line {reader.line_num + 1}: {err}") from None
