"""The experiments of LLMs-from-scratch's chapter 6 bonus table (`make experiments`):
each row as this pipeline's `-S` flags, where its run differs from the book's, what it
downloads, and the report that sets the results of `dvc exp show --json` beside the
published figures."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .config import Params
from .errors import SpamloraError
from .sweep import BOOK_ROW_PREFIX, finished

REPO = "rasbt/LLMs-from-scratch"
COMMIT = "00a466f0b949139f3076d50d59a2fc3efd516135"
FOLDER = "ch06/02_bonus_additional-experiments"
TABLE_FILE = f"{FOLDER}/README.md"
SCRIPT_FILE = f"{FOLDER}/additional-experiments.py"  # what produced the table
TABLE_URL = f"https://github.com/{REPO}/blob/{COMMIT}/{TABLE_FILE}"
SCRIPT_URL = f"https://github.com/{REPO}/blob/{COMMIT}/{SCRIPT_FILE}"

# The script's settings for every row: 5 epochs, AdamW lr 5e-5, weight decay 0.1, batch
# 8, seed 123, fp32 training and scoring, batches drawn at random. The data keys are
# params.yaml's defaults, the book's split byte for byte; they are set again so that a
# workspace whose params.yaml changed them still runs the book's rows on the book's split.
COMMON: dict[str, object] = {
    "data.dedupe": False, "data.balance": "undersample", "data.stratify": False,
    "data.seed": 123, "data.train_frac": 0.7, "data.val_frac": 0.1,
    "train.epochs": 5, "train.batch_size": 8, "train.lr": 5e-5, "train.weight_decay": 0.1,
    "train.seed": 123, "train.group_by_length": False,
    "train.precision": "fp32", "evaluate.precision": "fp32",
}

# What the book's padded rows share: `train.padding: max_length` pads every message to
# the longest training one (120 tokens), as the book's SpamDataset does.
PADDED = {"model.name": "gpt2", "model.weights": "pretrained", "train.trainable": "last_block",
          "train.token": "last", "train.max_length": None, "train.padding": "max_length"}
# No padding: every message at its own length (the book's --no_padding), none truncated.
UNPADDED = {**PADDED, "train.padding": "packed", "train.max_length": "model"}

# Where the padded rows with the `last` token differ (said once, for each row it concerns).
LAST_POSITION = ("`last` is each message's last real token; the book's script at this "
                 "commit reads the last position, padding for all but the longest "
                 "messages (its later `--trainable_token_pos flexible` reads as we do)")


@dataclass(frozen=True)
class Published:
    """One row of the book's table, as printed (row 12's context: its command runs
    batch 1 with 8 steps accumulated; row 9's: rank 16, alpha 8)."""
    model: str
    weights: str
    token: str
    trainable: str
    context: str
    train: float  # accuracies, in [0, 1]
    validation: float
    test: float
    minutes: float  # training time on an A100


@dataclass(frozen=True)
class Row:
    number: int
    slug: str
    book: Published
    flags: dict[str, object]  # beside COMMON
    # Where its run differs from the book's, beside COMMON_DIFFERENCES and LAST_POSITION
    differs: str = ""

    @property
    def name(self) -> str:
        """The DVC experiment's name, and so its MLflow run's."""
        return f"{BOOK_ROW_PREFIX}{self.number:02d}-{self.slug}"

    def all_flags(self) -> dict[str, object]:
        return {**COMMON, **self.flags}

    @property
    def needs(self) -> str:
        """What its download_model stage fetches, and whether the weights are read."""
        name = self.flags["model.name"]
        if self.flags["model.weights"] == "random":
            return (f"{name}'s config and tokenizer (download_model fetches its weights "
                    f"too; they are not read)")
        return f"pretrained {name} weights (about {DOWNLOAD_GB[name]} GB)"


# The fp32 weights file of each preset: parameters x 4 bytes.
DOWNLOAD_GB = {"gpt2": 0.5, "gpt2-medium": 1.4, "gpt2-large": 3.1, "gpt2-xl": 6.2}

SMALL, LONGEST = "gpt2-small (124M)", "longest train ex. (120)"


def _published(model=SMALL, weights="pretrained", token="last", trainable="last_block",
               context=LONGEST, *, train, validation, test, minutes) -> Published:
    return Published(model, weights, token, trainable, context, train, validation, test,
                     minutes)


ROWS: tuple[Row, ...] = (
    Row(1, "last-block", _published(train=.9663, validation=.9933, test=.95, minutes=.28),
        PADDED),
    Row(2, "first-token", _published(token="first", train=.7846, validation=.8054,
                                     test=.75, minutes=.28),
        {**PADDED, "train.token": "first"},
        "none: the first position is each message's first token in both"),
    Row(3, "last-layer", _published(trainable="last_layer", train=.7865, validation=.7987,
                                    test=.72, minutes=.25),
        {**PADDED, "train.trainable": "last_layer"}),
    Row(4, "all", _published(trainable="all", train=.9962, validation=.9664, test=.9667,
                             minutes=.69),
        {**PADDED, "train.trainable": "all"}),
    Row(5, "gpt2-medium", _published(model="gpt2-medium (355M)", train=.875,
                                     validation=.9128, test=.8467, minutes=.75),
        {**PADDED, "model.name": "gpt2-medium"},
        "no Hub commit or sha256 is pinned for gpt2-medium (model.revision auto: main)"),
    Row(6, "gpt2-large", _published(model="gpt2-large (774M)", train=.9952,
                                    validation=.9866, test=.9667, minutes=1.5),
        {**PADDED, "model.name": "gpt2-large"},
        "no Hub commit or sha256 is pinned for gpt2-large (model.revision auto: main)"),
    Row(7, "gpt2-xl", _published(model="gpt2-xl (1558M)", train=.9981, validation=.9933,
                                 test=.9833, minutes=2.83),
        {**PADDED, "model.name": "gpt2-xl"},
        "no Hub commit or sha256 is pinned for gpt2-xl (model.revision auto: main)"),
    Row(8, "random-all", _published(weights="random", trainable="all", train=1.0,
                                    validation=.9664, test=.9367, minutes=.69),
        {**PADDED, "model.weights": "random", "train.trainable": "all"},
        "the base is initialised as the book's GPTModel initialises itself, PyTorch's "
        "defaults after torch.manual_seed(train.seed); that the draws match the book's "
        "one for one is not checked"),
    Row(9, "lora-r16", _published(trainable="LoRA", train=.9952,
                                  validation=.9799, test=.9767, minutes=.75),
        {**PADDED, "train.trainable": "lora", "lora.rank": 16, "lora.alpha": 128.0,
         "lora.init": "textbook", "lora.dropout": 0.0,
         "lora.targets": ["query", "key", "value", "attn_out", "mlp_fc", "mlp_proj"]},
        "the book's update is alpha * x A B, not divided by the rank: lora.alpha=128 "
        "gives its scale 8 at rank 16. A starts uniform with fan-in r (std 1/sqrt(3r)); "
        "the script at this commit draws it from a normal of std 1/sqrt(r). The book also "
        "puts LoRA on the new head, which trains in full in both"),
    Row(10, "context-1024", _published(context="context length (1024)", train=.8308,
                                       validation=.8792, test=.7833, minutes=2.46),
        {**PADDED, "train.max_length": "model"},
        "the head reads each message's last real token, which padding after it cannot "
        "change (causal attention): expect row 1's accuracy at the cost of 1024-token "
        "rows. The book's drop comes from reading position 1024, padding for every "
        "message"),
    Row(11, "no-padding-batch-1", _published(context="variable: no padding (batch size 1)",
                                             train=1.0, validation=.9866, test=.98,
                                             minutes=1.75),
        {**UNPADDED, "train.batch_size": 1},
        "none: without padding the book's last position is the last real token too"),
    Row(12, "no-padding-accumulate-8", _published(
            context="variable: no padding (batch size 8)", train=.9933,
            validation=.9866, test=.9833, minutes=1.70),
        UNPADDED,
        "gradient accumulation is no param here; a packed batch of 8 scores every "
        "message as if alone, so its gradient is the mean of 8 single-message gradients: "
        "the updates of batch 1 with 8 steps accumulated (the script's --accumulation_"
        "steps help says as much). The script at this commit steps after its first "
        "message, then after every 8th"),
)
BY_NUMBER = {row.number: row for row in ROWS}
BY_NAME = {row.name: row for row in ROWS}

COMMON_DIFFERENCES = (
    "Batches are drawn in another seeded order, and the last partial batch of an epoch "
    "trains here (the book's loader drops it: 5 of 1,045 messages)",
    "Train accuracy is the evaluate stage's, over the whole training split after "
    "training; validation and test are the same splits as the book's",
    "Training seconds are the training loop's, its validation pass after each epoch "
    "included, on the hardware shown; `make experiments` runs EXPERIMENTS_JOBS "
    "experiments at once (default 2), which share that hardware: EXPERIMENTS_JOBS=1 "
    "for times that compare with the book's",
    "`test_unseen` is test accuracy on the test messages with no copy in the training "
    "split (docs/pipeline.md#honest-test-figures); the book publishes no such figure",
)


def reads_last_position(row: Row) -> bool:
    """Where the book's `last` read padding: padded rows whose head reads `last`."""
    return (row.flags["train.padding"] == "max_length"
            and row.flags["train.token"] == "last")


class UnknownRow(SpamloraError):
    pass


def select(numbers: list[int] | None) -> list[Row]:
    """The rows numbered (all for none), in the book's order."""
    if not numbers:
        return list(ROWS)
    unknown = sorted(set(numbers) - set(BY_NUMBER))
    if unknown:
        raise UnknownRow(f"no row {', '.join(map(str, unknown))} in the book's table "
                         f"(rows 1 to {len(ROWS)})")
    return [BY_NUMBER[n] for n in sorted(set(numbers))]


def flag_value(value: object) -> str:
    """A value as `dvc exp run -S` parses it (Hydra's override grammar)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(flag_value, value)) + "]"
    return str(value)


def parse_overrides(pairs: list[str] | None) -> dict[str, str]:
    """`key=value` overrides of every row (EXTRA), each a key of params.yaml; the value
    is passed to DVC as written."""
    known = set(Params().flat())
    overrides = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise UnknownRow(f"-S {pair}: not key=value with a key of params.yaml "
                             f"(section.key, e.g. train.epochs=1)")
        overrides[key] = value
    return overrides


def queue_command(row: Row, overrides: dict[str, str]) -> list[str]:
    """`dvc exp run --queue` of one row, named after it; `overrides` replace its flags
    (DVC is given each key once)."""
    flags = {k: flag_value(v) for k, v in row.all_flags().items()} | overrides
    return ["dvc", "exp", "run", "--queue", "-n", row.name,
            *[arg for k, v in flags.items() for arg in ("-S", f"{k}={v}")]]


def taken(exp_show: list[dict]) -> set[str]:
    """The names of `dvc exp show --json`'s experiments, but for failed ones (which leave
    no ref). DVC refuses a finished one's name when it is queued again, but a queued or
    running one's only when the second has trained and is collected."""
    return {experiment["name"]
            for entry in exp_show if entry.get("rev") != "workspace"
            for experiment in entry.get("experiments") or []
            if experiment.get("name")
            and (experiment.get("executor") or {}).get("state") != "failed"}


def _param(params: dict, dotted: str) -> object:
    section, key = dotted.split(".")
    return (params.get(section) or {}).get(key)


def _same(a: object, b: object) -> bool:
    """Equal as params: DVC's YAML reads 5e-05 as a float, PyYAML as a string."""
    try:
        return math.isclose(float(a), float(b))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return a == b


def overridden(row: Row, params: dict) -> dict[str, object]:
    """The row's flags this experiment ran with other values (e.g. EXTRA's)."""
    return {k: _param(params, k) for k, v in row.all_flags().items()
            if not _same(_param(params, k), v)}


COLUMNS = ["row", "experiment", "rev", "overridden", "train_accuracy", "validation_accuracy",
           "test_accuracy", "test_unseen_accuracy", "train_seconds", "hardware",
           "book_train_accuracy", "book_validation_accuracy", "book_test_accuracy",
           "book_train_seconds"]


def results(exp_show: list[dict]) -> pd.DataFrame:
    """One line per finished experiment named after a row, in the book's order."""
    lines = []
    for f in finished(exp_show):
        row = BY_NAME.get(f.name)
        if row is None:
            continue
        scores = f.metrics["metrics/eval.json"]
        train = f.metrics.get("metrics/train.json", {})
        changed = overridden(row, f.params)
        lines.append({
            "row": row.number, "experiment": f.name, "rev": f.rev,
            "overridden": " ".join(f"{k}={flag_value(v)}" for k, v in changed.items()),
            "train_accuracy": scores["train"]["accuracy"],
            "validation_accuracy": scores["validation"]["accuracy"],
            "test_accuracy": scores["test"]["accuracy"],
            "test_unseen_accuracy": (scores.get("test_unseen") or {}).get("accuracy"),
            "train_seconds": train.get("train_seconds"),
            "hardware": (train.get("run") or {}).get("hardware"),
            "book_train_accuracy": row.book.train,
            "book_validation_accuracy": row.book.validation,
            "book_test_accuracy": row.book.test,
            "book_train_seconds": row.book.minutes * 60})
    df = pd.DataFrame(lines, columns=COLUMNS)
    return df.sort_values(["row", "experiment"], kind="stable").reset_index(drop=True)


def _percent(value: object) -> str:
    return "–" if value is None or pd.isna(value) else f"{100 * value:.2f}%"


def _seconds(value: object) -> str:
    """Tenths of a second, and two significant digits under one second: a row that trains
    in 0.03 s (the frozen part cached, a small model) must not read as 0.0."""
    if value is None or pd.isna(value):
        return "–"
    return f"{value:.1f}" if value >= 1 else f"{value:.2g}"


def _flags(flags: dict[str, object]) -> str:
    return "`" + " ".join(f"{k}={flag_value(v)}" for k, v in flags.items()) + "`"


def markdown(df: pd.DataFrame) -> str:
    """The table beside the book's, what each row needs, and where the runs differ."""
    common = " ".join(f"-S {k}={flag_value(v)}" for k, v in COMMON.items())
    lines = [
        "# The book's chapter 6 experiments, run by this pipeline", "",
        f"The published figures are those of [{REPO}, `{TABLE_FILE}` at commit "
        f"`{COMMIT[:7]}`]({TABLE_URL}) ({COMMIT}), made by [`{SCRIPT_FILE}`]({SCRIPT_URL}) "
        f"at the same commit, each on an A100. Ours come from `dvc exp show --json`: "
        f"each row is the DVC experiment named in the table, and the MLflow run of the "
        f"same name. `spamlora experiments report` writes this file; `make experiments "
        f"ROWS=\"...\"` runs rows.", "",
        f"Every row runs with `{common}` (the book's settings for every row) and the "
        f"flags in its line. A flag an experiment ran with another value is shown in bold "
        f"(e.g. `EXTRA=\"-S train.epochs=1\"`): its figures are not the row's.", "",
        "| row | the book's row | experiment | flags | train | book | validation | book "
        "| test | book | test_unseen | seconds | book | hardware |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    ran = set(df["row"])
    for row in ROWS:
        book = row.book
        described = ", ".join((book.model, book.weights, book.token, book.trainable,
                               book.context))
        book_cells = (_percent(book.train), _percent(book.validation),
                      _percent(book.test), _seconds(book.minutes * 60))
        mine = df[df["row"] == row.number]
        if mine.empty:
            lines.append(f"| {row.number} | {described} | {row.name} (not run) "
                         f"| {_flags(row.flags)} "
                         f"| – | {book_cells[0]} | – | {book_cells[1]} | – | {book_cells[2]} "
                         f"| – | – | {book_cells[3]} | |")
        for r in mine.itertuples():
            changed = f" **{r.overridden}**" if r.overridden else ""
            lines.append(
                f"| {row.number} | {described} | {r.experiment} "
                f"| {_flags(row.flags)}{changed} "
                f"| {_percent(r.train_accuracy)} | {book_cells[0]} "
                f"| {_percent(r.validation_accuracy)} | {book_cells[1]} "
                f"| {_percent(r.test_accuracy)} | {book_cells[2]} "
                f"| {_percent(r.test_unseen_accuracy)} | {_seconds(r.train_seconds)} "
                f"| {book_cells[3]} | {r.hardware or ''} |")
    lines += ["", "Book columns: its training time in seconds (it prints minutes).", "",
              "## What each row needs", ""]
    for row in ROWS:
        state = "ran" if row.number in ran else "not run"
        lines.append(f"- Row {row.number} ({state}): {row.needs}.")
    lines += ["", "Every row but 8 reads pretrained weights: run those where the Hub (or "
              "a mirror, docs/downloads.md) can be reached.", "",
              "## Where the runs differ from the book's", ""]
    lines += [f"- Every row: {d}." for d in COMMON_DIFFERENCES]
    padded = [str(row.number) for row in ROWS if reads_last_position(row)]
    lines.append(f"- Rows {', '.join(padded)}: {LAST_POSITION}.")
    lines += [f"- Row {row.number}: {row.differs}." for row in ROWS if row.differs]
    lines += ["", "Every row of the book's table is expressed by this pipeline's params; "
              "none is left out.", ""]
    return "\n".join(lines)


def plot(df: pd.DataFrame, path: Path) -> None:
    """Test accuracy and training seconds of each row run, beside the book's."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    from .plots import plt, save_figure

    labels = [f"{r.row}: {r.experiment.removeprefix(BOOK_ROW_PREFIX)[3:]}" for r in
              df.itertuples()]
    y = list(range(len(df)))
    fig, (acc, secs) = plt.subplots(1, 2, figsize=(12, 2 + 0.6 * len(df)), sharey=True)
    height = 0.27
    acc.barh([i - height for i in y], df["test_accuracy"], height, label="test (ours)")
    acc.barh(y, df["test_unseen_accuracy"], height, label="test_unseen (ours)")
    acc.barh([i + height for i in y], df["book_test_accuracy"], height,
             label="test (book)", color="grey")
    acc.set_yticks(y, labels)
    acc.invert_yaxis()
    acc.set_xlim(0, 1)
    acc.set_xlabel("Accuracy")
    secs.barh([i - height / 2 for i in y], df["train_seconds"], height, label="ours")
    secs.barh([i + height / 2 for i in y], df["book_train_seconds"], height,
              label="book (A100)", color="grey")
    secs.set_xscale("log")  # an XL row takes ~10x a small one
    secs.xaxis.set_major_formatter(ScalarFormatter())
    secs.xaxis.set_minor_formatter(NullFormatter())
    secs.set_xlabel("Training seconds")
    for ax in (acc, secs):  # above the bars, which they would hide
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.01), ncol=3, fontsize="small")
    acc.set_title("The book's rows: test accuracy, ours beside the book's", pad=26)
    secs.set_title("Training seconds", pad=26)  # above the legends
    save_figure(fig, path)


def write_report(df: pd.DataFrame, out_dir: Path) -> None:
    from .data import write_csv
    from .fileio import write_text

    if df.empty:
        raise SpamloraError("no finished experiment named after a row of the book's table "
                            "in `dvc exp show` (`make experiments` runs them)")
    write_csv(df, out_dir / "experiments.csv")
    write_text(out_dir / "table.md", markdown(df))
    plot(df, out_dir / "accuracy.png")
