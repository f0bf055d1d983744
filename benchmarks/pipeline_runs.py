"""Whole pipeline runs, as a user starts them: the book's row 8 and the train stage per mode.

    python benchmarks/pipeline_runs.py                     # both, GPT-2 124M, random weights
    python benchmarks/pipeline_runs.py --seeds 123 --modes lora last_block

Pretrained GPT-2 cannot be downloaded here, so both run on GPT-2 124M's config with
random weights, served as a local folder (`model.url`, `model.sha256: null`); the data
is the real SMS Spam Collection zip from ../shared/data (its pinned sha256 checked).
Everything runs in a throw-away clone of the repository's last commit, through `dvc exp
run`, so the figures are the pipeline's own: metrics/eval.json and metrics/train.json.

- `--seeds`: the book's chapter 6 row 8 (GPT-2 124M with random weights, every parameter
  trained, 5 epochs, AdamW lr 5e-5, weight decay 0.1, batch 8, fp32), the row's flags from
  `spamlora.experiments`, with `train.seed` set per run and `train.padding=packed`
  (below). The book: training 100%, validation 96.64%, test 93.67% (seed 123, A100).
- `--modes`: the whole train stage (`dvc exp run ... train`: DVC, start-up, 2 epochs,
  checkpoints, the MLflow run and logged model) per `train.trainable`, at the defaults
  otherwise, on a store that exists.

Why packed for row 8: the head reads each message's last real token in every padding
mode here, and a packed batch scores every message as if alone, so `max_length` padding
(to 120 tokens, as the book) gives the same updates up to float rounding at ~4x the
tokens. Results go to benchmarks/results/pipeline_runs-DATE.json and benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_speed import (  # noqa: E402
    README,
    REPO,
    RESULTS,
    SHARED,
    capped,
    cpu_description,
    machine,
)

ROW8_START, ROW8_END = "<!-- book-row-8:start -->", "<!-- book-row-8:end -->"
STAGE_START, STAGE_END = "<!-- train-stage:start -->", "<!-- train-stage:end -->"


def workspace(root: Path) -> tuple[Path, dict[str, str]]:
    """A clone of the last commit whose sources are local: the real zip, a random GPT-2."""
    import shutil

    import torch
    import transformers

    zips = sorted((SHARED / "sms_spam").glob("*.zip"))
    if not zips:
        sys.exit(f"needs the SMS Spam Collection zip in {SHARED / 'sms_spam'}")
    bpe = SHARED / "gpt2_bpe"
    models = root / "models"
    model_dir = models / "gpt2"
    torch.manual_seed(0)  # the weights are not read (model.weights: random); the config is
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(model_dir)
    for name, candidates in (("vocab.json", ("vocab.json", "encoder.json")),
                             ("merges.txt", ("merges.txt", "vocab.bpe"))):
        source = next(bpe / c for c in candidates if (bpe / c).is_file())
        shutil.copy(source, model_dir / name)
    ws = root / "ws"
    subprocess.run(["git", "clone", "-q", str(REPO), str(ws)], check=True)
    params_file = ws / "params.yaml"
    params = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    params["data"]["url"] = str(zips[0])
    params["model"]["url"] = str(models / "{name}")
    params["model"]["sha256"] = None
    params["model"]["weights"] = "random"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8",
                           newline="\n")
    env = dict(os.environ, PYTHONPATH=str(ws / "src"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               GIT_AUTHOR_NAME="bench", GIT_COMMITTER_NAME="bench",
               GIT_AUTHOR_EMAIL="bench@localhost", GIT_COMMITTER_EMAIL="bench@localhost")
    subprocess.run(["git", "commit", "-qam", "local sources, random weights"], cwd=ws,
                   env=env, check=True)
    return ws, env


def exp_run(ws: Path, env: dict[str, str], name: str, flags: dict[str, str],
            target: str | None = None) -> dict:
    cmd = ["dvc", "exp", "run", "-n", name]
    for key, value in flags.items():
        cmd += ["-S", f"{key}={value}"]
    cmd += [target] if target else []
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ws, env=env, check=True)
    seconds = time.perf_counter() - start
    metrics = {f: json.loads((ws / "metrics" / f"{f}.json").read_text(encoding="utf-8"))
               for f in ("train", "eval") if (ws / "metrics" / f"{f}.json").is_file()}
    return {"name": name, "flags": flags, "seconds": seconds, **metrics}


def row8(ws: Path, env: dict[str, str], seeds: list[int]) -> list[dict]:
    from spamlora.experiments import BY_NUMBER, flag_value

    row = BY_NUMBER[8]
    runs = []
    for seed in seeds:
        flags = {k: flag_value(v) for k, v in row.all_flags().items()}
        flags |= {"train.seed": str(seed), "train.padding": "packed"}
        runs.append(exp_run(ws, env, f"{row.name}-seed-{seed}", flags))
    return runs


def stage_modes(ws: Path, env: dict[str, str], modes: list[str]) -> list[dict]:
    """The train stage at the defaults (2 epochs, lr 8e-4, bf16 where the CPU has it) but
    `train.trainable`, on a store made by a first run, so that its migrations are not
    counted against the first mode."""
    def run(name: str, flags: dict[str, str]) -> dict:
        # `-S` values stay in the workspace's params.yaml after a run (row 8's fp32, lr,
        # epochs...): each run starts from the committed defaults.
        subprocess.run(["git", "checkout", "-q", "--", "params.yaml"], cwd=ws, env=env,
                       check=True)
        return exp_run(ws, env, name, flags, "train")

    if not (ws / "mlflow.db").is_file():
        run("warm-up", {"train.epochs": "1", "train.trainable": "last_layer"})
    return [run(f"stage-{mode}", {"train.trainable": mode}) for mode in modes]


def _eval(run: dict, split: str) -> float:
    return run["eval"][split]["accuracy"]


def report_lines(report: dict) -> tuple[list[str], list[str]]:
    host = (f"Measured {report['date']} on {report['cpu']} ({report['machine']}; flags "
            f"{' '.join(report['cpu_flags'])}{capped(report)}), torch {report['torch']}, "
            f"{report['threads']} threads, load average {report['load_average_before'][0]:.2f} "
            "before.")
    row8_lines, stage_lines = [], []
    if report["row8"]:
        row8_lines = [ROW8_START, "", host, "",
                      "| `train.seed` | train | validation | test | `test_unseen` |",
                      "|---:|---:|---:|---:|---:|"]
        for run in report["row8"]:
            row8_lines.append(
                f"| {run['flags']['train.seed']} | {_eval(run, 'train'):.2%} | "
                f"{_eval(run, 'validation'):.2%} | {_eval(run, 'test'):.2%} | "
                f"{_eval(run, 'test_unseen'):.2%} |")
        if len(report["row8"]) > 1:
            means = [sum(_eval(run, split) for run in report["row8"]) / len(report["row8"])
                     for split in ("train", "validation", "test", "test_unseen")]
            row8_lines.append("| mean | " + " | ".join(f"{m:.2%}" for m in means) + " |")
        row8_lines += ["| the book (seed 123, A100) | 100.00% | 96.64% | 93.67% | – |",
                       "", ROW8_END]
    if report["stages"]:
        first = report["stages"][0]
        stage_lines = [STAGE_START, "", host, "",
                       "| `train.trainable` | train stage s | of which training s "
                       f"| vs `{first['flags']['train.trainable']}` | validation accuracy |",
                       "|---|---:|---:|---:|---:|"]
        for run in report["stages"]:
            stage_lines.append(
                f"| {run['flags']['train.trainable']} | {run['seconds']:.1f} | "
                f"{run['train']['train_seconds']:.1f} | "
                f"{first['seconds'] / run['seconds']:.2f}x | "
                f"{run['train']['val_accuracy']:.2%} |")
        stage_lines += ["", STAGE_END]
    return row8_lines, stage_lines


def replace_section(text: str, lines: list[str]) -> str:
    start, end = lines[0], lines[-1]
    head, found, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    block = "\n".join(lines)
    return head + block + tail if found else text.rstrip("\n") + "\n\n" + block + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[123, 1, 2],
                        help="train.seed of each row-8 run (none: skip row 8)")
    parser.add_argument("--modes", nargs="*", default=["lora", "last_block"],
                        help="train.trainable of each timed train stage (none: skip)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--with", dest="earlier", type=Path,
                        help="an earlier results file whose row-8 runs are reported "
                             "before these (the same pipeline code)")
    args = parser.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        ws, env = workspace(Path(tmp))
        report = {**machine(), **cpu_description(), "load_average_before": load,
                  "row8": (json.loads(args.earlier.read_text(encoding="utf-8"))["row8"]
                           if args.earlier else [])
                  + (row8(ws, env, args.seeds) if args.seeds else []),
                  "stages": stage_modes(ws, env, args.modes) if args.modes else []}
    out = args.out or RESULTS / f"pipeline_runs-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8", newline="\n")
    text = README.read_text(encoding="utf-8")
    for lines in report_lines(report):
        if lines:
            print("\n".join(lines))
            if args.out is None:
                text = replace_section(text, lines)
    if args.out is None:
        README.write_text(text, encoding="utf-8", newline="\n")


if __name__ == "__main__":
    main()
