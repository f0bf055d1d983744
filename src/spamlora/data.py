"""The labelled messages: fetch, parse strictly, balance, split.

The SMS Spam Collection (`data.format: uci-sms`) is one message a line,
`label<TAB>text`. It is parsed by hand rather than with `pandas.read_csv`: pandas'
default quoting takes a stray `"` for the start of a quoted field and silently merges
lines (5,572 rows instead of 5,574). Other labelled files are read by `formats`.

Labels become class indices in the order of `Classes.names` (the head's outputs): the
split files hold `id,text,label` with the index, so the default data's files are the
same bytes they were before other formats and classes existed.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from .config import check_class_names
from .download import Downloaded, Located, download, file_digest, locate
from .errors import SpamloraError
from .fileio import atomic_path, read_json, write_json
from .formats import ParseReport, read_labelled_file

MESSAGES_MEMBER = "SMSSpamCollection"
UCI_CLASSES = ("ham", "spam")  # the SMS Spam Collection's labels, in their index order
COLUMNS = ["id", "text", "label"]  # id: where the message is in the source file
CONFLICT_EXAMPLES = 5  # texts with two labels listed in metrics/data.json


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


def fetch_labelled(urls: list[str], dest: str | Path, file_name: str, record_name: str, *,
                   sha256: str | None, timeout: float, retries: int,
                   tracked: Callable[[Path], bool]) -> Located:
    """Find a labelled file (any format but uci-sms) and record in folder `dest` what
    was found (url, sha256, bytes, path). A URL is downloaded into `dest`; a local file
    is read in place, so it must be pinned by `sha256` or be `tracked` (a dependency
    DVC hashes): else a change in it would leave the pipeline's outputs stale unseen."""
    with atomic_path(dest, is_dir=True, record=record_name) as tmp:
        got = locate(urls, tmp / file_name, sha256=sha256, timeout=timeout,
                     retries=retries)
        if got.in_place and sha256 is None and not tracked(Path(got.path)):
            raise DataError(
                f"{got.path}: a local data file is read in place, and DVC reruns the "
                f"pipeline when it changes only if dvc.yaml lists it: add `- {got.path}` "
                f"to the deps of the download_data stage (or pin it with data.sha256)")
        path = got.path if got.in_place else str(Path(dest) / file_name)
        record = {**asdict(got), "path": path}
        write_json(tmp / record_name, record)
    return Located(**record)


def source_file(record_path: str | Path) -> Path:
    """The labelled file download_data recorded (read in place, or downloaded), checked
    to be what it recorded: a file changed since is not read as if it were the same."""
    record = read_json(record_path)
    path = Path(record["path"])
    if not path.is_file():
        raise DataError(f"{path}: not found (recorded in {record_path}); run the "
                        f"download_data stage again")
    digest, _ = file_digest(path)
    if digest != record["sha256"]:
        raise DataError(f"{path}: changed since the download_data stage read it (sha256 "
                        f"{digest}, recorded {record['sha256']}); run `dvc repro` again")
    return path


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


def _check_line(raw: bytes, index: dict[str, int]) -> tuple[int, str]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"invalid UTF-8 at byte {e.start}") from None
    if line.count("\t") != 1:
        raise DataError(f"expected exactly one tab between label and text, "
                        f"found {line.count(chr(9))}")
    label, text = line.split("\t")
    if label not in index:
        raise DataError(f"unknown label {label!r} (expected "
                        f"{' or '.join(map(repr, index))})")
    if not text.strip():
        raise DataError("empty message text")
    return index[label], text


def parse_messages(path: str | Path, on_bad_line: str = "error",
                   classes: tuple[str, ...] | list[str] = UCI_CLASSES
                   ) -> tuple[pd.DataFrame, ParseReport]:
    """Every message of the SMS Spam Collection file as (id, text, label), the label an
    index into `classes` (by default ham = 0, spam = 1).

    A bad line raises `DataError` naming the file and line, or with
    `on_bad_line="skip"` is dropped and listed in the report.
    """
    index = {name: i for i, name in enumerate(classes)}
    report = ParseReport()
    rows = []
    content = Path(path).read_bytes()
    lines = content.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    for number, raw in enumerate(lines, start=1):
        report.lines += 1
        try:
            label, text = _check_line(raw.removesuffix(b"\r"), index)
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


@dataclass(frozen=True)
class Classes:
    """The classes in index order (the head's outputs, every report) and, for two, the
    positive one (whose precision, recall and ROC are reported)."""
    names: tuple[str, ...]
    positive: str | None = None

    @property
    def positive_index(self) -> int | None:
        return None if self.positive is None else self.names.index(self.positive)

    def as_dict(self) -> dict:
        return {"classes": list(self.names), "positive": self.positive}

    def write(self, path: str | Path) -> None:
        write_json(path, self.as_dict())

    @classmethod
    def read(cls, path: str | Path) -> Classes:
        try:
            stored = read_json(path)
            classes = cls(tuple(stored["classes"]), stored["positive"])
        except FileNotFoundError:
            raise DataError(f"{path}: not found (run the balance stage first)") from None
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: not a classes file ({e})") from None
        return classes


DEFAULT_CLASSES = Classes(UCI_CLASSES, "spam")  # what adapters and splits of old assume


def resolve_classes(labels: pd.Series, wanted: list[str] | None, positive: str | None,
                    source: str | Path, fixed: tuple[str, ...] | None = None) -> Classes:
    """The classes of `labels` (strings): `wanted` in its order, else `fixed` (a format's
    own), else the sorted distinct labels; each must have messages, and there must be
    two or more. `positive` must be one of two classes (None: the second) and None for
    more."""
    found = sorted(set(labels))
    names = list(wanted or fixed or found)
    if len(found) < 2:
        only = f"the label {found[0]!r}" if found else "no label"
        raise DataError(f"{source}: every message has {only}: a classifier needs two or "
                        f"more classes")
    empty = [c for c in names if c not in found]
    if empty:
        raise DataError(f"{source}: no message has the label(s) {empty} of "
                        f"{'data.classes' if wanted else 'the format'} {names}")

    def err(ok: bool, why: str) -> None:
        if not ok:
            raise DataError(f"{source}: the labels found {why}")

    check_class_names(names, err)
    if len(names) > 2:
        if positive is not None:
            raise DataError(f"{source}: data.positive ({positive!r}) is for two classes "
                            f"only, and there are {len(names)}: {names}; set it to null")
        return Classes(tuple(names), None)
    if positive is None:
        positive = names[1]  # as label 1 (spam) is in the SMS data
    if positive not in names:
        raise DataError(f"{source}: data.positive {positive!r} is not one of the classes "
                        f"{names}; set it to one of them, or null (the second)")
    return Classes(tuple(names), positive)


def read_messages(path: str | Path, fmt: str, text_column: str, label_column: str,
                  on_bad_line: str, wanted: list[str] | None, positive: str | None
                  ) -> tuple[pd.DataFrame, Classes, ParseReport]:
    """Every message of a labelled file (any format) as (id, text, label index), its
    classes and the parse report. Every fault names the file, and the line or row."""
    if fmt == "uci-sms":
        names = tuple(wanted) if wanted else UCI_CLASSES
        df, report = parse_messages(path, on_bad_line, names)
        labels = df["label"].map(dict(enumerate(names)))
        classes = resolve_classes(labels, wanted, positive, path, fixed=UCI_CLASSES)
        return df, classes, report
    df, report = read_labelled_file(path, fmt, text_column, label_column, on_bad_line,
                                    wanted)
    classes = resolve_classes(df["label"], wanted, positive, path)
    index = {name: i for i, name in enumerate(classes.names)}
    return df.assign(label=df["label"].map(index).astype("int64")), classes, report


def label_conflicts(df: pd.DataFrame, classes: Classes,
                    examples: int = CONFLICT_EXAMPLES) -> dict:
    """Texts (after normalisation) that occur with two or more labels: how many, how
    many messages carry them, and the first few with their labels and ids. The model
    cannot get both right; usually a labelling mistake."""
    key = normalised(df["text"])
    labels_per_text = df.groupby(key)["label"].nunique()
    clashing = labels_per_text[labels_per_text > 1].index
    rows = df[key.isin(clashing)]
    listed = []
    for text in list(dict.fromkeys(normalised(rows["text"])))[:examples]:
        same = rows[normalised(rows["text"]) == text]
        listed.append({"text": text[:200],
                       "labels": sorted({classes.names[i] for i in same["label"]}),
                       "ids": same["id"].astype(int).tolist()[:10]})
    return {"texts": int(len(clashing)), "messages": int(len(rows)), "examples": listed}


def balance(df: pd.DataFrame, seed: int, mode: str = "undersample") -> pd.DataFrame:
    """`undersample`: every class cut to the size of the smallest, by a seeded sample,
    class by class in index order (ham first, then spam, as in the book's recipe, so the
    same seed gives the published split). `none`: every message kept."""
    counts = df["label"].value_counts()
    if len(counts) < 2:
        raise DataError("the data holds only one class; cannot balance")
    if mode == "none":
        return df.reset_index(drop=True)
    n = int(counts.min())
    parts = [df[df["label"] == label] for label in sorted(counts.index)]
    parts = [p.sample(n, random_state=seed) if len(p) > n else p for p in parts]
    return pd.concat(parts).reset_index(drop=True)


def _cut(n: int, train_frac: float, val_frac: float) -> tuple[int, int]:
    train_end = int(n * train_frac)
    return train_end, train_end + int(n * val_frac)


def split(df: pd.DataFrame, train_frac: float, val_frac: float, seed: int,
          stratify: bool = False) -> dict[str, pd.DataFrame]:
    """Seeded train / validation / test split. Not stratified: one shuffle of all
    messages, cut at the fractions (the textbook's split). Stratified: each class
    shuffled and cut at the fractions on its own, then each split shuffled."""
    if not stratify:
        shuffled = df.sample(frac=1, random_state=seed).reset_index(drop=True)
        train_end, val_end = _cut(len(shuffled), train_frac, val_frac)
        parts = {"train": shuffled[:train_end], "validation": shuffled[train_end:val_end],
                 "test": shuffled[val_end:]}
    else:
        pieces: dict[str, list[pd.DataFrame]] = {"train": [], "validation": [], "test": []}
        for label in sorted(df["label"].unique()):
            cls = df[df["label"] == label].sample(frac=1, random_state=seed)
            train_end, val_end = _cut(len(cls), train_frac, val_frac)
            pieces["train"].append(cls[:train_end])
            pieces["validation"].append(cls[train_end:val_end])
            pieces["test"].append(cls[val_end:])
        parts = {name: pd.concat(p).sample(frac=1, random_state=seed).reset_index(drop=True)
                 for name, p in pieces.items()}
    empty = [name for name, part in parts.items() if part.empty]
    if empty:
        raise DataError(f"split(s) {empty} would be empty with {len(df)} messages; "
                        f"adjust data.train_frac / data.val_frac")
    return parts


def check_split(parts: dict[str, pd.DataFrame], classes: Classes, source: str | Path,
                stratify: bool) -> None:
    """Every class must be in every split: training needs its messages, and validation
    and test score it."""
    for index, name in enumerate(classes.names):
        total = sum(int((p["label"] == index).sum()) for p in parts.values())
        for split_name, part in parts.items():
            if not (part["label"] == index).any():
                hint = "" if stratify else ", or set data.stratify: true"
                raise DataError(
                    f"{source}: class {name!r} has {total} message(s), and the split "
                    f"leaves none of them for {split_name}: add messages of {name!r} or "
                    f"change data.train_frac / data.val_frac{hint}")


def class_counts(df: pd.DataFrame, classes: Classes = DEFAULT_CLASSES) -> dict[str, int]:
    return {"rows": len(df), **{name: int((df["label"] == i).sum())
                                for i, name in enumerate(classes.names)}}


def split_counts(parts: dict[str, pd.DataFrame],
                 classes: Classes = DEFAULT_CLASSES) -> dict[str, dict[str, int]]:
    """Class counts of each split; for validation and test also how many rows have a
    copy in train, whose scores then measure memory, not generalisation, and how many of
    the positive class (of two), or of each class (of more), do. Two classes give the
    keys they always gave (`spam_in_train` for the SMS data)."""
    counts = {name: class_counts(part, classes) for name, part in parts.items()}
    counted = ([classes.positive] if classes.positive is not None else classes.names)
    for name, part in parts.items():
        if name != "train":
            copies = part[seen_in(part, parts["train"])]
            counts[name]["in_train"] = len(copies)
            for cls in counted:
                index = classes.names.index(cls)
                counts[name][f"{cls}_in_train"] = int((copies["label"] == index).sum())
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
