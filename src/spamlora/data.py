"""The SMS Spam Collection: extract, parse strictly, balance, split.

The file is one message a line, `label<TAB>text`. It is parsed by hand rather than with
`pandas.read_csv`: pandas' default quoting takes a stray `"` for the start of a quoted
field and silently merges lines (5,572 rows instead of 5,574).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .download import Downloaded, download
from .errors import SpamloraError
from .fileio import atomic_path, write_json

MESSAGES_MEMBER = "SMSSpamCollection"
LABELS = {"ham": 0, "spam": 1}
COLUMNS = ["id", "text", "label"]  # id: the message's line number in SMSSpamCollection


class DataError(SpamloraError, ValueError):
    pass


def fetch_dataset(urls: list[str], dest: str | Path, zip_name: str, messages_name: str,
                  record_name: str, *, sha256: str | None, timeout: float,
                  retries: int) -> Downloaded:
    """Download the dataset zip into folder `dest`, extract the messages file and record
    what was fetched (url, sha256, bytes); `dest` appears only when all three exist."""
    with atomic_path(dest, is_dir=True, record=record_name) as tmp:
        got = download(urls, tmp / zip_name, sha256=sha256, timeout=timeout,
                       retries=retries)
        extract_messages(tmp / zip_name, tmp / messages_name)
        write_json(tmp / record_name, got.as_dict())
    return got


def extract_messages(zip_path: str | Path, dest: str | Path) -> None:
    """Copy the `SMSSpamCollection` member of the dataset zip to `dest`."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = [m for m in archive.namelist()
                       if Path(m).name == MESSAGES_MEMBER and not m.endswith("/")]
            if not members:
                raise DataError(f"{zip_path}: holds no {MESSAGES_MEMBER} file "
                                f"(members: {archive.namelist()})")
            with atomic_path(dest) as tmp:
                tmp.write_bytes(archive.read(members[0]))
    except zipfile.BadZipFile as e:
        raise DataError(f"{zip_path}: not a valid zip archive ({e})") from None


@dataclass
class ParseReport:
    lines: int = 0
    skipped: list[dict] = field(default_factory=list)  # {"line": n, "reason": "..."}

    def as_dict(self) -> dict:
        return {"lines": self.lines, "skipped": len(self.skipped),
                "skipped_lines": self.skipped}


def _check_line(raw: bytes) -> tuple[int, str]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"invalid UTF-8 at byte {e.start}") from None
    if line.count("\t") != 1:
        raise DataError(f"expected exactly one tab between label and text, "
                        f"found {line.count(chr(9))}")
    label, text = line.split("\t")
    if label not in LABELS:
        raise DataError(f"unknown label {label!r} (expected 'ham' or 'spam')")
    if not text.strip():
        raise DataError("empty message text")
    return LABELS[label], text


def parse_messages(path: str | Path, on_bad_line: str = "error") -> tuple[pd.DataFrame,
                                                                           ParseReport]:
    """Every message of the file as (id, text, label); ham = 0, spam = 1.

    A bad line raises `DataError` naming the file and line, or with
    `on_bad_line="skip"` is dropped and listed in the report.
    """
    report = ParseReport()
    rows = []
    content = Path(path).read_bytes()
    lines = content.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    for number, raw in enumerate(lines, start=1):
        report.lines += 1
        try:
            label, text = _check_line(raw.removesuffix(b"\r"))
        except DataError as e:
            if on_bad_line != "skip":
                raise DataError(f"{path}, line {number}: {e}") from None
            report.skipped.append({"line": number, "reason": str(e)})
            continue
        rows.append((number, text, label))
    return pd.DataFrame(rows, columns=COLUMNS), report


def normalised(texts: pd.Series) -> pd.Series:
    """Texts with runs of white space folded to one space and the ends stripped: two
    messages equal under this are copies of each other."""
    return texts.map(lambda text: " ".join(text.split()))


def dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """The first message of each distinct (normalised) text: 5,574 -> 5,160 on the real
    data. A repeated spam text otherwise lands in train and test alike."""
    return df[~normalised(df["text"]).duplicated()].reset_index(drop=True)


def seen_in(part: pd.DataFrame, train: pd.DataFrame) -> pd.Series:
    """Which rows of `part` have a copy (after normalisation) in `train`."""
    return normalised(part["text"]).isin(set(normalised(train["text"])))


def balance(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Undersample the larger class to the size of the smaller (ham first, then spam, as
    in the book's recipe, so the same seed gives the published split)."""
    counts = df["label"].value_counts()
    if len(counts) < 2:
        raise DataError("the data holds only one class; cannot balance")
    n = int(counts.min())
    parts = [df[df["label"] == label] for label in sorted(LABELS.values())]
    parts = [p.sample(n, random_state=seed) if len(p) > n else p for p in parts]
    return pd.concat(parts).reset_index(drop=True)


def split(df: pd.DataFrame, train_frac: float, val_frac: float,
          seed: int) -> dict[str, pd.DataFrame]:
    shuffled = df.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(shuffled) * train_frac)
    val_end = train_end + int(len(shuffled) * val_frac)
    parts = {"train": shuffled[:train_end], "validation": shuffled[train_end:val_end],
             "test": shuffled[val_end:]}
    empty = [name for name, part in parts.items() if part.empty]
    if empty:
        raise DataError(f"split(s) {empty} would be empty with {len(df)} messages; "
                        f"adjust data.train_frac / data.val_frac")
    return parts


def class_counts(df: pd.DataFrame) -> dict[str, int]:
    return {"rows": len(df), "ham": int((df["label"] == 0).sum()),
            "spam": int((df["label"] == 1).sum())}


def split_counts(parts: dict[str, pd.DataFrame]) -> dict[str, dict[str, int]]:
    """Class counts of each split; for validation and test also how many rows (and spam
    rows) have a copy in train, whose scores then measure memory, not generalisation."""
    counts = {name: class_counts(part) for name, part in parts.items()}
    for name, part in parts.items():
        if name != "train":
            copies = part[seen_in(part, parts["train"])]
            counts[name]["in_train"] = len(copies)
            counts[name]["spam_in_train"] = int((copies["label"] == 1).sum())
    return counts


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    """UTF-8 with "\n" line ends on every OS (pandas' default is `os.linesep`): the
    splits, and the digests DVC and MLflow take of them, do not depend on the OS."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n", encoding="utf-8")


def read_labelled_csv(path: str | Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype={"id": "int64", "text": "string", "label": "int64"},
                         keep_default_na=False)
    except FileNotFoundError:
        raise DataError(f"{path}: not found (run the split stage first)") from None
    except ValueError as e:
        raise DataError(f"{path}: not a valid split file: {e}") from None
    if list(df.columns) != COLUMNS:
        raise DataError(f"{path}: expected columns {COLUMNS}, found {list(df.columns)}")
    return df
