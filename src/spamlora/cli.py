"""The `spamlora` command: summary, predict, promote, download-model, checkpoints,
sweep-report, experiments."""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import shlex
import stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

from .config import DownloadParams, ModelParams
from .errors import SpamloraError
from .fileio import no_space_message
from .paths import Paths
from .presets import PRESETS, TRAINABLE
from .stage import INTERRUPTED_STATUS


class UsageError(SpamloraError):
    pass


def _summary(args: argparse.Namespace) -> None:
    from .adapter import AdapterSpec
    from .classifier import (
        build_classifier,
        counts_by_mode,
        format_counts_by_mode,
        format_summary,
        parameter_counts,
    )
    from .model import GPTConfig, GPTModel
    from .weights import load_gpt2

    if args.weights:
        base = load_gpt2(args.weights)
    else:
        base = GPTModel(GPTConfig.preset(args.model))
    spec = AdapterSpec(args.model, base.cfg, args.lora_rank, args.lora_alpha or args.lora_rank,
                       num_classes=args.num_classes, trainable=args.trainable)
    model = build_classifier(base, spec, seed=123)
    print(format_summary(model, parameter_counts(model)))
    print(f"\nThe classifier in every mode (`{args.trainable}` above):")
    print(format_counts_by_mode(counts_by_mode(spec)))


def _download_model(args: argparse.Namespace) -> None:
    from .weights import fetch_model

    model = ModelParams(name=args.name, url=args.url, revision=args.revision,
                        sha256=None if args.no_checksums else "auto")
    record = fetch_model(model.name, model.base_url, args.dest, args.timeout, args.retries,
                         model.resolved_revision, model.expected_sha256)
    for name, got in record.items():
        check = "verified" if got["verified"] else "unchecked"
        print(f"{args.dest / name}: {got['bytes']:,} bytes, sha256 {got['sha256']} "
              f"({check}), from {got['source']}")


def _checkpoints(args: argparse.Namespace) -> None:
    import time

    from .checkpoint import FOLDER, prune, stored
    from .tracking import repo_root

    root = repo_root()
    now = time.time()
    if args.action == "list":
        entries = stored(root)
        if not entries:
            print(f"no checkpoints in {root / FOLDER}")
        for e in entries:
            state = (f"running (process {e.owner.pid} on {e.owner.host})" if e.running
                     else "stopped")
            run = e.owner.run_id if e.owner and e.owner.run_id else "(starting)"
            print(f"{e.folder}: {state}, run {run}, {e.where()}, {e.bytes / 1e6:.1f} MB, "
                  f"last written {(now - e.modified) / 3600:.1f} h ago")
        return
    if args.older_than is None or args.older_than < 0:
        raise UsageError("prune needs --older-than DAYS (0 or more): checkpoints of "
                         "computations not written to for that long are removed")
    removed = prune(root, args.older_than * 86400, now, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for e in removed:
        print(f"{verb} {e.folder} ({e.where()}, {e.bytes / 1e6:.1f} MB)")
    print(f"{verb} {len(removed)} checkpoint folder(s); running trainings' are never "
          f"touched")


def _dvc(*args: str) -> str:
    """What a `dvc` command printed; its error, when it failed."""
    import subprocess

    proc = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UsageError(f"`dvc {' '.join(args)}` failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def _exp_show(all_commits: bool) -> list[dict]:
    return json.loads(_dvc("exp", "show", "--json",
                           *(["--all-commits"] if all_commits else [])))


def _sweep_report(args: argparse.Namespace) -> None:
    from .sweep import experiments, markdown, write_report

    df = experiments(_exp_show(args.all_commits))
    write_report(df, args.out)
    print(markdown(df))
    print(f"wrote {args.out}/experiments.csv, by_rank.md, accuracy_vs_rank.png")


def _experiments(args: argparse.Namespace) -> None:
    from . import experiments as book

    if args.action == "report":
        if args.rows or args.set:
            raise UsageError("report takes no rows or -S: it reports every row run")
        df = book.results(_exp_show(args.all_commits))
        book.write_report(df, args.out)
        print(book.markdown(df))
        print(f"wrote {args.out}/table.md, experiments.csv, accuracy.png")
        return
    rows = book.select(args.rows)
    overrides = book.parse_overrides(args.set)
    if args.action == "list":
        for row in rows:
            print(f"row {row.number}, needs {row.needs}:\n"
                  f"  {shlex.join(book.queue_command(row, overrides))}")
        return
    # Every row checked before any is queued: none queued if one cannot be.
    taken = sorted(book.taken(_exp_show(False)) & {row.name for row in rows})
    if taken:
        raise UsageError(f"experiment(s) {', '.join(taken)} exist already on this commit "
                         f"(run, running or queued): `dvc exp remove {' '.join(taken)}` to "
                         f"run them again")
    for row in rows:
        _dvc(*book.queue_command(row, overrides)[1:])
        print(f"queued {row.name} (needs {row.needs})")


CHUNK_MESSAGES = 1024  # scored, then written, at a time: memory bounded by this


def _open_text(path: str):
    """A text stream that ends lines at "\n" only (a "\r" before it is dropped later):
    str.splitlines would also split messages at \x0c, \x85 or \u2028. A leading BOM
    (Excel's "CSV UTF-8") is dropped."""
    if path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", newline="\n")
    try:
        return open(path, encoding="utf-8-sig", newline="\n")
    except FileNotFoundError:
        raise UsageError(f"{path}: not found") from None


def _can_read_twice(path: str) -> bool:
    """A regular file; not a pipe, `<(...)` or /dev/stdin, which give their lines once."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _messages(handle, name: str, text_column: str | None) -> Iterator[tuple[str, str]]:
    """(message, where it came from) for each line or CSV row of `handle`."""
    try:
        if text_column:
            reader = csv.reader(handle)
            header = next(reader, None) or []
            if text_column not in header:
                raise UsageError(f"{name}: no column {text_column!r} (columns: {header})")
            column = header.index(text_column)
            for row in reader:
                where = f"{name}, row {reader.line_num}"
                if len(row) <= column:
                    raise UsageError(f"{where}: {len(row)} field(s), but the header has "
                                     f"{len(header)}: no {text_column!r} value")
                yield row[column], where
        else:
            for number, line in enumerate(handle, start=1):
                yield line.removesuffix("\n").removesuffix("\r"), f"{name}, line {number}"
    except UnicodeDecodeError as e:
        raise UsageError(f"{name}: not valid UTF-8 ({e})") from None


def _checked(messages: Iterable[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    any_message = False
    for text, where in messages:
        if not text.strip():
            raise UsageError(f"empty message at {where}")
        any_message = True
        yield text, where
    if not any_message:
        raise UsageError("no messages given (pass text, --file FILE, or - for stdin)")


def _read_messages(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """The messages and where each came from, read lazily. A regular file is checked
    whole first (empty messages, short CSV rows, bad UTF-8), so a bad line stops the
    command before it prints anything; stdin, a pipe or `<(...)` can be read once only
    and is checked as it goes."""
    if args.file and args.texts:
        raise UsageError("give messages as arguments or with --file, not both")
    source = args.file or ("-" if args.texts == ["-"] else None)
    if source is None:
        return _checked((text, f"argument {i}") for i, text in enumerate(args.texts, 1))
    name = "<stdin>" if source == "-" else source
    if source != "-" and _can_read_twice(source):
        with _open_text(source) as handle:
            for _ in _checked(_messages(handle, name, args.text_column)):
                pass

    def stream() -> Iterator[tuple[str, str]]:
        with _open_text(source) as handle:
            yield from _checked(_messages(handle, name, args.text_column))

    return stream()


class _Utf8Stdout:
    """stdout as UTF-8 with no newline translation, whatever the locale: redirected on
    Windows, stdout encodes with the code page (cp1252: a message with an emoji fails
    half-way) and turns each "\n" into "\r\n" (the csv module's "\r\n" into
    "\r\r\n"). Writes its bytes to stdout's buffer, so results are the same bytes on
    every OS."""

    def __init__(self, buffer: BinaryIO):
        self.buffer = buffer

    def write(self, text: str) -> int:
        self.buffer.write(text.encode("utf-8"))
        return len(text)

    def flush(self) -> None:
        self.buffer.flush()


def _utf8_stdout() -> TextIO | _Utf8Stdout:
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a str-only stream (io.StringIO): nothing to encode
        return sys.stdout
    sys.stdout.flush()  # what was printed before comes first
    return _Utf8Stdout(buffer)


class _Writer:
    """Writes results as they come: a CSV header or the table's once, then rows. The
    table shows one probability: of two classes the positive one's (`spam_prob`), of
    more the predicted class's (`prob`)."""

    def __init__(self, fmt: str, out: TextIO | _Utf8Stdout,
                 classes: tuple[str, ...] = ("ham", "spam"), positive: str | None = "spam"):
        self.fmt, self.out, self.started = fmt, out, False
        self.positive = positive
        self.width = max(6, *map(len, classes))

    def write(self, results: list[dict]) -> None:
        if self.fmt == "jsonl":
            for row in results:
                print(json.dumps(row, ensure_ascii=False), file=self.out)
        elif self.fmt == "csv":
            writer = csv.DictWriter(self.out, fieldnames=list(results[0]),
                                    lineterminator="\n")
            if not self.started:
                writer.writeheader()
            writer.writerows(results)
        else:
            width, column = 60, (f"{self.positive}_prob" if self.positive else "prob")
            shown = max(9, len(column))
            if not self.started:
                print(f"{'label':<{self.width}} {column:>{shown}}  message", file=self.out)
            for row in results:
                text = row["text"].replace("\n", " ")
                text = text if len(text) <= width else text[: width - 1] + "…"
                prob = row[f"{self.positive or row['label']}_probability"]
                print(f"{row['label']:<{self.width}} {prob:>{shown}.4f}  {text}",
                      file=self.out)
        self.started = True
        self.out.flush()


def _predict(args: argparse.Namespace) -> None:
    from .inference import predictions
    from .predictor import Predictor

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold must lie in [0, 1], got {args.threshold}")
    messages = _read_messages(args)
    first = next(messages)  # an empty input fails here, before the model loads
    if args.model:
        from .mlflow_model import load_predictor

        if args.adapter:
            raise UsageError("give --model or --adapter, not both")
        predictor = load_predictor(args.model, args.weights, device=args.device,
                                   precision=args.precision, batch_size=args.batch_size)
    else:
        predictor = Predictor(args.weights or Paths().base_model,
                              args.adapter or Paths().adapter, device=args.device,
                              precision=args.precision, batch_size=args.batch_size,
                              strict=args.strict)
    spec = predictor.spec
    classes, positive = spec.class_names, spec.positive_index
    if positive is None and args.threshold is not None:
        raise UsageError(f"--threshold is for two classes; this adapter has "
                         f"{len(classes)} ({', '.join(classes)}): each message gets the "
                         f"most probable")
    threshold = 0.5 if args.threshold is None else args.threshold
    writer = _Writer(args.format, _utf8_stdout(), classes,
                     None if positive is None else classes[positive])
    chunk = [first]
    for item in itertools.chain(messages, [None]):
        if item is not None:
            chunk.append(item)
            if len(chunk) < CHUNK_MESSAGES:
                continue
        if not chunk:
            break
        texts = [text for text, _ in chunk]
        probs, truncated = predictor.probabilities(texts)
        for i in truncated:
            print(f"warning: {chunk[i][1]} is longer than {predictor.spec.max_length} "
                  f"tokens and was truncated", file=sys.stderr)
        labels = predictions(probs, positive, threshold)
        writer.write([{"text": t, "label": classes[label],
                       **{f"{c}_probability": float(p) for c, p in zip(classes, row,
                                                                       strict=True)}}
                      for t, label, row in zip(texts, labels, probs, strict=True)])
        chunk = []


def _promote(args: argparse.Namespace) -> None:
    from .registry import promote

    if args.lowest and not args.best:
        raise UsageError("--lowest goes with --best METRIC")
    done = promote(args.run, args.exp, args.best, args.lowest, args.name, args.alias)
    via = "" if done.run_id == done.chosen_run_id else (
        f" (chosen run {done.chosen_run_id} reused its training)")
    print(f"registered {done.name} version {done.version} from run {done.run_id}{via}")
    print(f"alias {done.alias!r} -> version {done.version}: {done.alias_uri}")
    print(f"this version: {done.version_uri}")
    for warning in done.warnings:
        print(f"warning: {warning}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spamlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("summary", help="print the classifier's structure and parameter "
                                       "counts, in each train.trainable mode")
    s.add_argument("--model", default="gpt2",
                   choices=["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
    s.add_argument("--lora-rank", type=int, default=8)
    s.add_argument("--lora-alpha", type=float, default=None,
                   help="default: equal to the rank")
    s.add_argument("--num-classes", type=int, default=2)
    s.add_argument("--trainable", default="lora", choices=TRAINABLE,
                   help="what is trained besides the head, as train.trainable")
    init = s.add_mutually_exclusive_group()
    init.add_argument("--random-init", action="store_true",
                      help="random weights of the preset's shape (default; no download)")
    init.add_argument("--weights", type=Path, help="a Hugging Face GPT-2 folder")
    s.set_defaults(func=_summary)

    d = sub.add_parser("download-model", help="fetch a GPT-2 base model folder (weights, "
                                              "config, tokenizer), e.g. to use an adapter "
                                              "on another machine")
    d.add_argument("dest", type=Path)
    d.add_argument("--name", default=ModelParams.name, choices=sorted(PRESETS))
    d.add_argument("--url", default=ModelParams.url,
                   help="base URL or local folder; {name} and {revision} are filled in")
    d.add_argument("--revision", default=ModelParams.revision,
                   help="Hub commit or tag (auto: the one pinned for --name)")
    d.add_argument("--no-checksums", action="store_true",
                   help="do not check the files against the pinned sha256 (a mirror of "
                        "other weights)")
    d.add_argument("--timeout", type=float, default=DownloadParams.timeout)
    d.add_argument("--retries", type=int, default=DownloadParams.retries)
    d.set_defaults(func=_download_model)

    c = sub.add_parser("checkpoints", help="list or prune the checkpoints interrupted "
                                           "trainings keep for their resume")
    c.add_argument("action", choices=["list", "prune"])
    c.add_argument("--older-than", type=float, metavar="DAYS",
                   help="prune: folders not written to for this many days (0: every "
                        "stopped training's)")
    c.add_argument("--dry-run", action="store_true", help="prune: only say what would go")
    c.set_defaults(func=_checkpoints)

    r = sub.add_parser("sweep-report", help="table and plot of test accuracy and trainable "
                                            "parameters against LoRA rank, from "
                                            "`dvc exp show`")
    r.add_argument("--out", type=Path, default=Paths().metrics_dir / "sweep")
    r.add_argument("--all-commits", action="store_true",
                   help="experiments of every commit, not only those of HEAD")
    r.set_defaults(func=_sweep_report)

    e = sub.add_parser("experiments", help="the book's chapter 6 experiments: list its "
                                           "rows as flags, queue them as named DVC "
                                           "experiments, or report them beside the book's "
                                           "figures (metrics/experiments/table.md)")
    e.add_argument("action", choices=["list", "queue", "report"])
    e.add_argument("rows", nargs="*", type=int, metavar="ROW",
                   help="list, queue: the book's row numbers (default: every row)")
    e.add_argument("-S", "--set", action="append", metavar="KEY=VALUE",
                   help="list, queue: a param for every row, replacing the book's (e.g. "
                        "-S train.epochs=1 for a quick try); repeatable")
    e.add_argument("--out", type=Path, default=Paths().metrics_dir / "experiments")
    e.add_argument("--all-commits", action="store_true",
                   help="report: experiments of every commit, not only those of HEAD")
    e.set_defaults(func=_experiments)

    p = sub.add_parser("predict", help="classify messages with a trained adapter: the "
                                       "label, and with --format jsonl/csv each class's "
                                       "probability (<class>_probability)")
    p.add_argument("texts", nargs="*", help="messages; '-' reads one a line from stdin")
    p.add_argument("--file", help="a file of messages, one a line ('-': stdin), or a CSV "
                                  "with --text-column")
    p.add_argument("--text-column", help="read --file as CSV and take this column")
    p.add_argument("--adapter", type=Path,
                   help=f"an adapter file (default: {Paths().adapter})")
    p.add_argument("--weights", type=Path,
                   help=f"the base GPT-2 folder the adapter was trained on (default: "
                        f"{Paths().base_model}; with --model: the base the logged model "
                        f"references is found or downloaded)")
    p.add_argument("--model", metavar="URI",
                   help="a logged model instead of --adapter: runs:/<run id>/model or "
                        "models:/spamlora-sms@champion (the store: MLFLOW_TRACKING_URI, "
                        "else ./mlflow.db)")
    p.add_argument("--format", choices=["table", "jsonl", "csv"], default="table")
    p.add_argument("--threshold", type=float, default=None,
                   help="two classes: the positive one (spam) when its probability is at "
                        "least this (default 0.5); more classes: not allowed, the most "
                        "probable wins")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--strict", action="store_true",
                   help="refuse a base model whose files differ from those the adapter "
                        "was trained on (default: a warning), hashing every base file in "
                        "full (default: digests cached by size, mtime and inode are trusted)")
    p.set_defaults(func=_predict)

    m = sub.add_parser("promote", help="register one run's model in the MLflow Model "
                                       "Registry and move an alias to it")
    which = m.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", metavar="RUN_ID")
    which.add_argument("--exp", metavar="DVC_EXP_NAME",
                       help="the newest finished run of this DVC experiment")
    which.add_argument("--best", metavar="METRIC",
                       help="the finished run with the highest METRIC: a validation one, "
                            "e.g. validation.accuracy (a test metric is warned about)")
    m.add_argument("--lowest", action="store_true", help="with --best: the lowest wins")
    m.add_argument("--name", default="spamlora-sms", help="registered model name")
    m.add_argument("--alias", default="champion")
    m.set_defaults(func=_promote)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SpamloraError as e:
        print(f"spamlora {args.command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    except OSError as e:
        if (message := no_space_message(e)) is None:
            raise
        print(f"spamlora {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: what was printed stands, no traceback
        print(f"spamlora {args.command}: stopped", file=sys.stderr)
        return INTERRUPTED_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(main())
