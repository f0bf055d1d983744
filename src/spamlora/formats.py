"""Reading a file of labelled texts: CSV, TSV, JSON Lines or Parquet.

Every reader gives the same table: each message's id (where it is in the file: the line
its row starts on, for Parquet its row number), its text and its label as a string. A
fault of one row (an empty text, a row with too many fields, a label outside the
classes) is an error naming the file and line, or with `on_bad_line="skip"` is dropped
and listed in the report. A fault of the whole file (not the format it is said to be, a
missing column, a text column of numbers, bytes that are not UTF-8) is always an error.

CSV and TSV are read with the csv module in strict mode rather than with pandas: pandas'
C parser silently takes a quote that is never closed as the start of a field that runs to
the end of the file. TSV is quoted as spreadsheets and pandas write it (a field that
holds a tab, a quote or a line break in double quotes); a `"` inside an unquoted field
stays a character.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import SpamloraError

TEXT_FORMATS = ("csv", "tsv", "jsonl")
FORMATS = (*TEXT_FORMATS, "parquet")
NAMES = {"csv": "CSV", "tsv": "TSV", "jsonl": "JSON Lines", "parquet": "Parquet"}
COLUMNS = ["id", "text", "label"]
# A text that is a number only: a text column made of these is an id or a score column.
NUMBER = re.compile(r"\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*")
# The start of files that are not text, by the bytes every such file begins with.
MAGIC = {b"PAR1": "a Parquet file", b"PK\x03\x04": "a zip archive",
         b"\x1f\x8b": "a gzip file"}


class FormatError(SpamloraError, ValueError):
    pass


@dataclass
class ParseReport:
    lines: int = 0  # records read (lines of the SMS file, rows of a table)
    skipped: list[dict] = field(default_factory=list)  # {"line" or "row": n, "reason"}

    def as_dict(self) -> dict:
        return {"lines": self.lines, "skipped": len(self.skipped),
                "skipped_lines": self.skipped}


class Rows:
    """Collects (id, text, label) rows; a bad row raises, or is skipped and reported."""

    def __init__(self, path: Path, on_bad_line: str, classes: list[str] | None,
                 unit: str = "line"):
        self.path, self.on_bad_line, self.unit = path, on_bad_line, unit
        self.classes = None if classes is None else set(classes)
        self.listed = classes
        self.rows: list[tuple[int, str, str]] = []
        self.report = ParseReport()

    def where(self, number: int) -> str:
        return f"{self.path}, {self.unit} {number}"

    def bad(self, number: int, reason: str) -> None:
        if self.on_bad_line != "skip":
            raise FormatError(f"{self.where(number)}: {reason}")
        self.report.skipped.append({self.unit: number, "reason": reason})

    def add(self, number: int, text: object, label: object) -> None:
        self.report.lines += 1
        if not isinstance(text, str):
            return self.bad(number, f"the text is {_kind(text)}, not a string")
        if not text.strip():
            return self.bad(number, "empty text")
        label = _label(label)
        if label is None:
            return self.bad(number, "no label")
        if not isinstance(label, str):
            return self.bad(number, f"the label is {_kind(label)}, not a string")
        if self.classes is not None and label not in self.classes:
            return self.bad(number, f"label {label!r} is not one of data.classes "
                                    f"{self.listed}")
        self.rows.append((number, text, label))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=COLUMNS)


def _label(value: object) -> object:
    """A label as text: strings as they are, whole numbers (JSON's 0/1, an int column)
    as their digits; anything else (a float, a bool, null) is returned for the caller to
    refuse. An empty string is no label."""
    if isinstance(value, str):
        return value if value != "" else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _kind(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "missing (null)"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    return f"a {type(value).__name__}"


def sniff(head: bytes) -> str | None:
    """What a file that is not text is, from its first bytes; None for text."""
    for magic, what in MAGIC.items():
        if head.startswith(magic):
            return what
    return "a binary file" if b"\0" in head[:4096] else None


def _decode(path: Path, content: bytes, fmt: str) -> str:
    what = sniff(content)
    if what is not None:
        raise FormatError(f"{path}: is {what}, not a {NAMES[fmt]} file (data.format: {fmt})")
    try:
        return content.decode("utf-8-sig")  # a leading BOM (Excel's "CSV UTF-8") dropped
    except UnicodeDecodeError as e:
        line = content[:e.start].count(b"\n") + 1
        raise FormatError(f"{path}, line {line}: not valid UTF-8 (byte {e.start}); save "
                          f"the file as UTF-8") from None


def _format_hint(path: Path, first_line: str, fmt: str) -> str:
    """Why the first line suggests another format, or ''."""
    line = first_line.strip()
    if fmt != "jsonl" and line.startswith("{"):
        return "; it looks like JSON Lines (data.format: jsonl?)"
    if fmt == "csv" and "\t" in line and "," not in line:
        return "; it looks tab-separated (data.format: tsv?)"
    if fmt == "tsv" and "," in line and "\t" not in line:
        return "; it looks comma-separated (data.format: csv?)"
    return ""


def _columns(path: Path, header: list[str], text_column: str, label_column: str,
             fmt: str, first_line: str, where: str) -> tuple[int, int]:
    """The positions of the text and label columns in `header`."""
    found = []
    for name, key in ((text_column, "text_column"), (label_column, "label_column")):
        if header.count(name) > 1:
            raise FormatError(f"{where}: column {name!r} appears {header.count(name)} "
                              f"times in the header {header}")
        if name not in header:
            raise FormatError(f"{where}: no column {name!r} (data.{key}); the header has "
                              f"{header}" + _format_hint(path, first_line, fmt))
        found.append(header.index(name))
    return found[0], found[1]


def _check_not_numbers(path: Path, rows: Rows, column: str, unit: str = "line") -> None:
    """A text column whose every value is a number is an id or score column, not text."""
    texts = [(n, t) for n, t, _ in rows.rows]
    if texts and all(NUMBER.fullmatch(t) for _, t in texts):
        number, text = texts[0]
        raise FormatError(f"{path}: column {column!r} holds only numbers (e.g. {unit} "
                          f"{number}: {text!r}), not message texts; is data.text_column "
                          f"the right column?")


def _csv_records(text: str, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(line the record starts on, fields) of CSV or TSV `text`, blank lines left out."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            sep = "comma" if delimiter == "," else "tab"
            raise FormatError(f"line {start}: not valid {'CSV' if sep == 'comma' else 'TSV'}"
                              f" ({e}); a field with a {sep}, quote or line break must be "
                              f"in double quotes, its quotes doubled") from None
        if row:
            yield start, row
        start = reader.line_num + 1


def read_table(path: Path, content: bytes, fmt: str, text_column: str, label_column: str,
               on_bad_line: str, classes: list[str] | None) -> tuple[pd.DataFrame,
                                                                    ParseReport]:
    """CSV or TSV with a header row."""
    text = _decode(path, content, fmt)
    records = _csv_records(text, "," if fmt == "csv" else "\t")
    try:
        first = next(records, None)
        if first is None:
            raise FormatError(f"{path}: empty: no header row")
        number, header = first
        first_line = text.split("\n", 1)[0]
        t, lab = _columns(path, header, text_column, label_column, fmt, first_line,
                          f"{path}, line {number}")
        rows = Rows(path, on_bad_line, classes)
        for number, fields in records:
            if len(fields) != len(header):
                rows.report.lines += 1
                hint = (" (a comma in an unquoted text?)" if fmt == "csv" and
                        len(fields) > len(header) else "")
                rows.bad(number, f"{len(fields)} field(s), but the header has "
                                 f"{len(header)}{hint}")
                continue
            rows.add(number, fields[t], fields[lab])
    except FormatError as e:
        message = str(e)
        raise FormatError(message if message.startswith(str(path)) else
                          f"{path}, {message}") from None
    _check_not_numbers(path, rows, text_column)
    return rows.frame(), rows.report


def read_jsonl(path: Path, content: bytes, text_column: str, label_column: str,
               on_bad_line: str, classes: list[str] | None) -> tuple[pd.DataFrame,
                                                                    ParseReport]:
    """One JSON object a line. The first line must be one, whatever `on_bad_line`: a
    file whose first line is not is in another format."""
    text = _decode(path, content, "jsonl")
    rows = Rows(path, on_bad_line, classes)
    first = True
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            why = None if isinstance(record, dict) else f"a JSON {_json_kind(record)}"
        except json.JSONDecodeError as e:
            why = f"not valid JSON ({e.msg} at column {e.colno})"
        if why is not None:
            if first:
                raise FormatError(f"{path}, line {number}: {why}, not a JSON object: the "
                                  f"file is not JSON Lines (data.format: jsonl)"
                                  + _format_hint(path, line, "jsonl"))
            rows.report.lines += 1
            rows.bad(number, f"{why}, not a JSON object")
            continue
        first = False
        missing = [k for k in (text_column, label_column) if k not in record]
        if missing:
            rows.report.lines += 1
            rows.bad(number, f"no key {missing[0]!r} (keys: {sorted(record)})")
            continue
        rows.add(number, record[text_column], record[label_column])
    if first:
        raise FormatError(f"{path}: empty: no JSON object in it")
    return rows.frame(), rows.report


def _json_kind(value: object) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def read_parquet(path: Path, text_column: str, label_column: str, on_bad_line: str,
                 classes: list[str] | None) -> tuple[pd.DataFrame, ParseReport]:
    """Through pandas' reader (pyarrow: `pip install spamlora[parquet]`)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head.startswith(b"PAR1"):
        what = sniff(head) or "text"
        raise FormatError(f"{path}: is {what}, not a Parquet file (data.format: parquet)")
    try:
        table = pd.read_parquet(path)
    except ImportError as e:
        raise FormatError(f"{path}: reading Parquet needs pyarrow: pip install "
                          f"'spamlora[parquet]' ({e})") from None
    except Exception as e:  # pyarrow's errors have no common base worth naming
        raise FormatError(f"{path}: not a readable Parquet file ({type(e).__name__}: "
                          f"{e})") from None
    header = [str(c) for c in table.columns]
    t, lab = _columns(path, header, text_column, label_column, "parquet", "", str(path))
    texts, labels = table.iloc[:, t], table.iloc[:, lab]
    if pd.api.types.is_numeric_dtype(texts) or pd.api.types.is_bool_dtype(texts):
        raise FormatError(f"{path}: column {text_column!r} holds numbers ({texts.dtype}), "
                          f"not message texts; is data.text_column the right column?")
    if pd.api.types.is_float_dtype(labels):
        raise FormatError(f"{path}: column {label_column!r} holds fractional numbers "
                          f"({labels.dtype}); labels must be strings or whole numbers")
    rows = Rows(path, on_bad_line, classes, unit="row")
    for number, (text, label) in enumerate(zip(texts.tolist(), labels.tolist(),
                                               strict=True), start=1):
        rows.add(number, text, label)
    _check_not_numbers(path, rows, text_column, "row")
    return rows.frame(), rows.report


def read_labelled_file(path: str | Path, fmt: str, text_column: str, label_column: str,
                       on_bad_line: str = "error", classes: list[str] | None = None
                       ) -> tuple[pd.DataFrame, ParseReport]:
    """Every message of a labelled file as (id, text, label); see the module docstring.
    `classes`: the labels allowed (None: any)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}: one of {list(FORMATS)}")
    try:
        if fmt == "parquet":
            return read_parquet(path, text_column, label_column, on_bad_line, classes)
        content = path.read_bytes()
    except FileNotFoundError:
        raise FormatError(f"{path}: not found") from None
    if fmt == "jsonl":
        return read_jsonl(path, content, text_column, label_column, on_bad_line, classes)
    return read_table(path, content, fmt, text_column, label_column, on_bad_line, classes)
