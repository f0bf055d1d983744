"""The `spamlora` command: summary, predict, download-model, sweep-report."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from .config import DownloadParams, ModelParams
from .errors import SpamloraError
from .paths import Paths
from .presets import PRESETS


class UsageError(SpamloraError):
    pass


def _summary(args: argparse.Namespace) -> None:
    from .adapter import AdapterSpec
    from .classifier import build_classifier, format_summary, parameter_counts
    from .model import GPTConfig, GPTModel
    from .weights import load_gpt2

    if args.weights:
        base = load_gpt2(args.weights)
    else:
        base = GPTModel(GPTConfig.preset(args.model))
    spec = AdapterSpec(args.model, base.cfg, args.lora_rank, args.lora_alpha or args.lora_rank,
                       num_classes=args.num_classes)
    model = build_classifier(base, spec, seed=123)
    print(format_summary(model, parameter_counts(model)))


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


def _sweep_report(args: argparse.Namespace) -> None:
    import subprocess

    from .sweep import experiments, markdown, write_report

    command = ["dvc", "exp", "show", "--json"] + (["--all-commits"] if args.all_commits else [])
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UsageError(f"`dvc exp show --json` failed: {proc.stderr.strip()[-500:]}")
    df = experiments(json.loads(proc.stdout))
    write_report(df, args.out)
    print(markdown(df))
    print(f"wrote {args.out}/experiments.csv, by_rank.md, accuracy_vs_rank.png")


def _read_messages(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The messages and, for error messages, where each came from."""
    if args.file and args.texts:
        raise UsageError("give messages as arguments or with --file, not both")
    if args.file:
        source = sys.stdin if args.file == "-" else None
        name = "<stdin>" if source else args.file
        try:
            handle = source or open(args.file, encoding="utf-8", newline="")
        except FileNotFoundError:
            raise UsageError(f"{args.file}: not found") from None
        try:
            with handle:
                if args.text_column:
                    reader = csv.DictReader(handle)
                    if args.text_column not in (reader.fieldnames or []):
                        raise UsageError(f"{name}: no column {args.text_column!r} (columns: "
                                         f"{reader.fieldnames})")
                    rows = [row[args.text_column] for row in reader]
                    where = [f"{name}, row {i}" for i in range(2, len(rows) + 2)]
                else:
                    rows = handle.read().splitlines()
                    where = [f"{name}, line {i}" for i in range(1, len(rows) + 1)]
        except UnicodeDecodeError as e:
            raise UsageError(f"{name}: not valid UTF-8 ({e})") from None
    elif args.texts == ["-"]:
        rows = sys.stdin.read().splitlines()
        where = [f"<stdin>, line {i}" for i in range(1, len(rows) + 1)]
    else:
        rows = list(args.texts)
        where = [f"argument {i}" for i in range(1, len(rows) + 1)]
    if not rows:
        raise UsageError("no messages given (pass text, --file FILE, or - for stdin)")
    empty = [w for w, text in zip(where, rows, strict=True) if not text.strip()]
    if empty:
        raise UsageError(f"empty message(s) at {', '.join(empty[:5])}"
                         + (f" and {len(empty) - 5} more" if len(empty) > 5 else ""))
    return rows, where


def _write(results: list[dict], fmt: str) -> None:
    if fmt == "jsonl":
        for row in results:
            print(json.dumps(row, ensure_ascii=False))
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    else:
        width = 60
        print(f"{'label':<6} {'spam_prob':>9}  message")
        for row in results:
            text = row["text"].replace("\n", " ")
            text = text if len(text) <= width else text[: width - 1] + "…"
            print(f"{row['label']:<6} {row['spam_probability']:>9.4f}  {text}")


def _predict(args: argparse.Namespace) -> None:
    from .predictor import Predictor

    if not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold must lie in [0, 1], got {args.threshold}")
    texts, where = _read_messages(args)
    predictor = Predictor(args.weights, args.adapter, device=args.device,
                          precision=args.precision, batch_size=args.batch_size,
                          strict=args.strict)
    probs, truncated = predictor.spam_probabilities(texts)
    for i in truncated:
        print(f"warning: {where[i]} is longer than {predictor.spec.max_length} tokens and "
              f"was truncated", file=sys.stderr)
    results = [{"text": t, "label": "spam" if p >= args.threshold else "ham",
                "spam_probability": float(p)} for t, p in zip(texts, probs, strict=True)]
    _write(results, args.format)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spamlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("summary", help="print the LoRA classifier's structure and "
                                       "parameter counts")
    s.add_argument("--model", default="gpt2",
                   choices=["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
    s.add_argument("--lora-rank", type=int, default=8)
    s.add_argument("--lora-alpha", type=float, default=None,
                   help="default: equal to the rank")
    s.add_argument("--num-classes", type=int, default=2)
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

    r = sub.add_parser("sweep-report", help="table and plot of test accuracy and trainable "
                                            "parameters against LoRA rank, from "
                                            "`dvc exp show`")
    r.add_argument("--out", type=Path, default=Paths().metrics_dir / "sweep")
    r.add_argument("--all-commits", action="store_true",
                   help="experiments of every commit, not only those of HEAD")
    r.set_defaults(func=_sweep_report)

    p = sub.add_parser("predict", help="classify messages with a trained adapter")
    p.add_argument("texts", nargs="*", help="messages; '-' reads one a line from stdin")
    p.add_argument("--file", help="a file of messages, one a line ('-': stdin), or a CSV "
                                  "with --text-column")
    p.add_argument("--text-column", help="read --file as CSV and take this column")
    p.add_argument("--adapter", type=Path, default=Paths().adapter)
    p.add_argument("--weights", type=Path, default=Paths().base_model,
                   help="the base GPT-2 folder the adapter was trained on")
    p.add_argument("--format", choices=["table", "jsonl", "csv"], default="table")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="spam when the spam probability is at least this")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--strict", action="store_true",
                   help="refuse a base model whose files differ from those the adapter "
                        "was trained on (default: a warning)")
    p.set_defaults(func=_predict)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
