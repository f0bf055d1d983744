"""Where a training step's time goes, beside what this machine's GEMMs can do (issue 27).

    python benchmarks/profile_step.py                 # GPT-2 124M, the real training split
    python benchmarks/profile_step.py --size tiny     # a quick check of the script
    python benchmarks/profile_step.py --cases spamlora spamlora-padded spamlora-grouped peer-tuned

Profiles training steps of spamlora's own loop (`train_classifier`, the pipeline's
defaults: packed random batches, `precision: auto`) and of transformers + peft (the
tuned peer of train_speed.py: dropout 0, bf16 autocast where spamlora would use bf16,
random padded batches), each in its own process, on the same messages; on request
(`--cases`) also spamlora with the same random batches padded instead of packed
(`spamlora-padded`, `train.padding: batch`: the same messages in each step, so the two
columns differ only by packing) and with padded batches of similar length
(`spamlora-grouped`, `group_by_length: true`: other messages in each step), to see what
packing costs or saves on this CPU. Each step's CPU
time is split by operator (the profiler's self time) into the frozen GEMMs (forward and
input gradient), the LoRA products, the head, attention, GELU, LayerNorm, casts, the
optimizer and the rest. For the GEMMs, the achieved GFLOPS stand beside the ceiling:
the same shapes, strides and dtypes timed alone with `torch.mm` on this machine.
Results go to benchmarks/results/profile_step-<date>.json and, with --readme, to the
table in benchmarks/README.md.

With --primitives, each case also trains in two more processes with
`ONEDNN_VERBOSE=profile_create` (one epoch of the whole split, and the profiled steps'
own batches), to count the oneDNN primitives it creates: the first GEMM of each new
shape (a packed row's width, a padded batch's) JIT-compiles its kernels inside the
profiled operator, so the profile's GEMM times include that one-off cost wherever the
profiled steps meet new shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import train_speed  # noqa: E402  (the benchmarks' shared inputs and peer settings)

README = HERE / "README.md"
TABLE_START, TABLE_END = "<!-- profile:start -->", "<!-- profile:end -->"
WARMUP_STEPS, PROFILED_STEPS = 4, 12
STEP_MARK = "profile_step: step done"
# GEMM operators and the position of their first matrix among their inputs
# oneDNN's product with a pre-packed weight (`packed.PackedLinear`): x @ W.T, W (N, K)
PACKED = "mkldnn::_linear_pointwise"
GEMMS = {"aten::mm": 0, "aten::addmm": 1, "aten::addmm_": 1, "aten::bmm": 0,
         "aten::baddbmm": 1, PACKED: 0}
PARTS = ("frozen GEMM forward", "frozen GEMM input-grad", "LoRA products", "head",
         "attention", "GELU", "LayerNorm", "casts", "optimizer", "other")


# --- what each profiled operator is --------------------------------------------------------

def ancestors(event) -> list[str]:
    names, parent = [], event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def gemm_dims(event) -> tuple[int, int, int, int] | None:
    """(batch, M, K, N) of a GEMM event, from its recorded input shapes."""
    first = GEMMS.get(event.name)
    if first is None:
        return None
    a, b = event.input_shapes[first], event.input_shapes[first + 1]
    if event.name == PACKED:
        return 1, a[0], a[1], b[0]
    if len(a) == 3:
        return a[0], a[1], a[2], b[2]
    return 1, a[0], a[1], b[1]


def part_of(event, rank: int, classes: int) -> str:
    name, above = event.name, ancestors(event)
    if name.startswith("Optimizer.") or any(a.startswith("Optimizer.") for a in above):
        return "optimizer"
    backward = any("Backward" in a for a in above) or "backward" in name
    dims = gemm_dims(event)
    if dims is not None:
        smallest = min(dims[1:])
        if any("Bmm" in a or "attention" in a.lower() for a in above) or dims[0] > 1:
            return "attention"
        if smallest <= classes:
            return "head"
        if smallest <= 4 * rank:  # r, or 3r where Q, K and V's LoRA run as one product
            return "LoRA products"
        return "frozen GEMM input-grad" if backward else "frozen GEMM forward"
    if "attention" in name or "softmax" in name:
        return "attention"
    if "gelu" in name:
        return "GELU"
    if "layer_norm" in name:
        return "LayerNorm"
    if name in ("aten::to", "aten::_to_copy", "aten::copy_"):
        return "casts"
    return "other"


# --- one case, in its own process ----------------------------------------------------------

def profile_case(case: str, data_dir: Path, model_dir: Path, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    limit = (WARMUP_STEPS + steps) * train_speed.BATCH
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                   schedule=schedule(wait=0, warmup=WARMUP_STEPS, active=steps, repeat=1))
    walls: list[float] = []
    state = {"t": 0.0, "tokens": 0}

    def on_step(*_):
        walls.append(time.perf_counter() - state["t"])
        prof.step()
        state["t"] = time.perf_counter()

    prof.start()
    state["t"] = time.perf_counter()
    if case.startswith("spamlora"):
        info = spamlora_steps(data_dir, model_dir, limit, on_step, **layout(case))
    else:
        info = peer_steps(data_dir, model_dir, limit, on_step)
    prof.stop()
    events = [e for e in prof.profiler.function_events
              if e.name not in ("ProfilerStep*",) and not e.name.startswith("ProfilerStep")]
    rank = train_speed.RANK
    seconds, flops, other = defaultdict(float), defaultdict(float), defaultdict(float)
    shapes: dict[tuple, dict] = {}
    for e in events:
        part = part_of(e, rank, 2)
        seconds[part] += e.self_cpu_time_total / 1e6
        if part == "other":
            other[e.name] += e.self_cpu_time_total / 1e6
        dims = gemm_dims(e)
        # Under autocast a GEMM is recorded twice, the cast-dispatching call around the
        # kernel's: count the work once, at the innermost.
        if dims is not None and not any(c.name in GEMMS for c in e.cpu_children):
            n = 2.0 * dims[0] * dims[1] * dims[2] * dims[3]
            flops[part] += n
            first = GEMMS[e.name]
            key = (part, e.name, tuple(map(tuple, e.input_shapes[first: first + 2])),
                   tuple(map(tuple, e.structured_input_strides[first: first + 2])),
                   e.input_dtypes[first])
            entry = shapes.setdefault(key, {"calls": 0, "seconds": 0.0, "flops": n})
            entry["calls"] += 1
            entry["seconds"] += e.self_cpu_time_total / 1e6
    measured = walls[WARMUP_STEPS: WARMUP_STEPS + steps]
    ceilings = gemm_ceilings(shapes, torch)
    per_step = {p: {"ms": 1000 * seconds[p] / steps,
                    "gflops": flops[p] / seconds[p] / 1e9 if flops[p] and seconds[p] else None,
                    "ceiling_gflops": ceilings.get(p)} for p in PARTS}
    tokens = info["tokens"][WARMUP_STEPS: WARMUP_STEPS + steps]
    computed = info["computed"][WARMUP_STEPS: WARMUP_STEPS + steps]
    return {"precision": info["precision"], "steps": steps,
            "wall_ms_per_step": 1000 * sum(measured) / steps,
            "profiled_ms_per_step": 1000 * sum(seconds.values()) / steps,
            "real_tokens_per_step": sum(tokens) / steps,
            "computed_tokens_per_step": sum(computed) / steps,
            "wall_us_per_real_token": 1e6 * sum(measured) / sum(tokens),
            "parts": per_step,
            # what "other" is made of: the operators that take most of it, ms a step
            "other_top": {name: 1000 * s / steps
                          for name, s in sorted(other.items(), key=lambda kv: -kv[1])[:10]}}


def layout(case: str) -> dict[str, bool]:
    """How a spamlora case lays out its batches (`spamlora_steps`' arguments)."""
    return {"padded": case != "spamlora", "grouped": case == "spamlora-grouped"}


def train_one_epoch(case: str, data_dir: Path, model_dir: Path, limit: int | None) -> None:
    """The case's training on the first `limit` messages (None: all), one epoch, a line
    on stdout after each step (flushed, so that it lands between oneDNN's verbose
    lines, which oneDNN flushes as it writes them)."""
    def on_step(*_):
        print(STEP_MARK, flush=True)

    if case.startswith("spamlora"):
        spamlora_steps(data_dir, model_dir, limit, on_step, **layout(case))
    else:
        peer_steps(data_dir, model_dir, limit, on_step)


def child_output(what: str, *args: str, env: dict | None = None) -> str:
    """The stdout of this script run again with `args`; the run's end of stderr, and an
    exit, if it failed."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        sys.exit(f"{what} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def creation_by_step(verbose: str) -> list[list[float]] | None:
    """From a child's `ONEDNN_VERBOSE=profile_create` output, for each finished step,
    oneDNN's milliseconds for each primitive it created for want of a cached one (a
    step's own and those made since the step before); None where oneDNN printed
    nothing (it ran no product)."""
    if "onednn_verbose" not in verbose:
        return None
    steps, current = [], []
    for line in verbose.splitlines():
        if line == STEP_MARK:
            steps.append(current)
            current = []
        elif line.startswith("onednn_verbose") and ",create:cache_miss," in line:
            current.append(float(line.rsplit(",", 1)[1]))
    return steps


def primitives(case: str, data_dir: Path, model_dir: Path, steps: int) -> dict | None:
    """The primitives a case creates: over one epoch of the whole split, and in the
    steps `profile_case` profiles (the same messages and batches, in a fresh process)."""
    def created(limit: int | None) -> list[list[float]] | None:
        return creation_by_step(child_output(
            f"{case}'s epoch", "--child-epoch", case, "--dirs", str(data_dir),
            str(model_dir), *([] if limit is None else ["--limit", str(limit)]),
            env={**os.environ, "ONEDNN_VERBOSE": "profile_create"}))

    epoch = created(None)
    window = created((WARMUP_STEPS + steps) * train_speed.BATCH)
    if epoch is None or window is None:
        return None
    profiled = window[WARMUP_STEPS: WARMUP_STEPS + steps]
    return {"epoch_steps": len(epoch), "created": sum(map(len, epoch)),
            "created_seconds": sum(map(sum, epoch)) / 1000,
            "created_in_profiled_steps": sum(map(len, profiled)),
            "created_ms_per_profiled_step": sum(map(sum, profiled)) / steps}


def gemm_ceilings(shapes: dict, torch) -> dict[str, float]:
    """Per part, the GFLOPS its GEMMs reach alone: each distinct shape, stride and dtype
    timed with torch.mm/bmm (best of five rounds), weighted by its calls."""
    dtypes = {"float": torch.float32, "c10::BFloat16": torch.bfloat16,
              "c10::Half": torch.float16}
    flops, seconds = defaultdict(float), defaultdict(float)
    for (part, gemm, (sa, sb), (ta, tb), dtype), entry in shapes.items():
        dt = dtypes.get(dtype)
        if dt is None:
            continue
        a = torch.empty_strided(sa, ta, dtype=dt).normal_()
        if gemm == PACKED:  # beside the plain GEMM the packed weight stands in for
            b = torch.empty(sb, dtype=dt).normal_().t()
        else:
            b = torch.empty_strided(sb, tb, dtype=dt).normal_()
        op = torch.bmm if len(sa) == 3 else torch.mm
        for _ in range(3):
            op(a, b)
        reps = max(1, min(50, int(2e9 / entry["flops"])))
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(reps):
                op(a, b)
            best = min(best, (time.perf_counter() - t) / reps)
        flops[part] += entry["calls"] * entry["flops"]
        seconds[part] += entry["calls"] * best
    return {p: flops[p] / seconds[p] / 1e9 for p in flops if seconds[p]}


def spamlora_steps(data_dir: Path, model_dir: Path, limit: int | None, on_step,
                   padded: bool = False, grouped: bool = False) -> dict:
    """The pipeline's training loop on the first `limit` messages (None: all), one epoch;
    `padded`: each batch padded to its longest message instead of packed; `grouped`
    (padded only): batches of similar length instead of random ones."""
    from spamlora import batching
    from spamlora.adapter import AdapterSpec
    from spamlora.batching import encode, truncate
    from spamlora.classifier import build_classifier
    from spamlora.config import LoRAParams, TrainParams
    from spamlora.precision import resolve_device, resolve_precision
    from spamlora.tokenizer import Tokenizer
    from spamlora.train import train_classifier
    from spamlora.weights import load_gpt2

    train = train_speed.load_split(data_dir, "train", limit)
    params = TrainParams(epochs=1, batch_size=train_speed.BATCH, lr=train_speed.LR,
                         weight_decay=train_speed.WEIGHT_DECAY, seed=train_speed.SEED,
                         padding="batch" if padded else "packed", group_by_length=grouped)
    tokenizer = Tokenizer(model_dir)
    base = load_gpt2(model_dir)
    device = resolve_device(params.device)
    dtype = resolve_precision(params.precision, device)
    ids, _ = encode(tokenizer, train["text"].tolist(), None)
    max_length = min(max(map(len, ids)), base.cfg.context_length)
    ids, _ = truncate(ids, max_length)
    spec = AdapterSpec("gpt2", base.cfg, train_speed.RANK, train_speed.RANK,
                       max_length=max_length, pad_id=tokenizer.pad_id,
                       init=LoRAParams().init)
    model = build_classifier(base, spec, seed=params.seed)
    # The batches the loop will draw: the same generator, seeded as train_classifier's.
    import torch
    order = batching.training_order([len(t) for t in ids], params.batch_size,
                                    torch.Generator().manual_seed(params.seed),
                                    params.group_by_length)
    tokens = [sum(len(ids[i]) for i in index) for index in order]
    computed = [(batching.collate(ids, index, tokenizer.pad_id, None, batching.PAD_MULTIPLE,
                                  max_length) if padded else
                 batching.pack(ids, index, tokenizer.pad_id, base.cfg.context_length,
                               batching.packed_row_multiple(device, dtype))).ids.numel()
                for index in order]
    # No validation pass: a single message, after the profiled steps.
    train_classifier(model, ids, train["label"].to_numpy(), ids[:1],
                     train["label"].to_numpy()[:1], params, tokenizer.pad_id, max_length,
                     device, dtype, on_step=on_step)
    return {"precision": str(dtype).removeprefix("torch."), "tokens": tokens,
            "computed": computed}


def peer_steps(data_dir: Path, model_dir: Path, limit: int | None, on_step) -> dict:
    """train_speed.py's tuned peer loop on the first `limit` messages (None: all)."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader

    from spamlora.precision import resolve_precision

    train = train_speed.load_split(data_dir, "train", limit)
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(train_speed.SEED)
    model = transformers.GPT2ForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, pad_token_id=tokenizer.pad_token_id,
        **train_speed.PEER_TUNED_CONFIG)
    model = get_peft_model(model, LoraConfig(
        r=train_speed.RANK, lora_alpha=train_speed.RANK,
        target_modules=["c_attn", "c_proj", "c_fc"], modules_to_save=["score"]))
    rows = [{**tokenizer(text, truncation=True, max_length=1024), "labels": int(label)}
            for text, label in zip(train["text"], train["label"], strict=True)]
    loader = DataLoader(rows, batch_size=train_speed.BATCH, shuffle=True,
                        collate_fn=transformers.DataCollatorWithPadding(tokenizer),
                        generator=torch.Generator().manual_seed(train_speed.SEED))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=train_speed.LR, weight_decay=train_speed.WEIGHT_DECAY)
    bf16 = resolve_precision("auto", torch.device("cpu")) == torch.bfloat16
    tokens, computed = [], []
    model.train()
    for batch in loader:
        tokens.append(int(batch["attention_mask"].sum()))
        computed.append(batch["input_ids"].numel())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        on_step()
    return {"precision": "bfloat16" if bf16 else "float32", "tokens": tokens,
            "computed": computed}


# --- the report ----------------------------------------------------------------------------

def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return [f for f in wanted if f in flags]


def markdown(report: dict) -> str:
    cases = report["cases"]
    names = list(cases)
    lines = [f"{report['date']}, {report['cpu']} ({', '.join(report['cpu_flags'])}"
             f"{train_speed.capped(report)}), "
             f"{report['threads']} threads, torch {report['torch']}, GPT-2 "
             f"{report['size']}, {report['steps']} steps after {WARMUP_STEPS} of warm-up "
             f"(`python benchmarks/profile_step.py`):", ""]
    head = "| part | " + " | ".join(f"{n} ms/step | {n} GFLOPS (ceiling)" for n in names)
    lines += [head + " |", "|---|" + "---:|---:|" * len(names)]
    for part in PARTS:
        cells = []
        for n in names:
            p = cases[n]["parts"][part]
            g = (f"{p['gflops']:.0f} ({p['ceiling_gflops']:.0f})"
                 if p["gflops"] and p["ceiling_gflops"] else "")
            cells += [f"{p['ms']:.1f}", g]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    for label, key, fmt in (("profiled total", "profiled_ms_per_step", "{:.1f}"),
                            ("wall time a step", "wall_ms_per_step", "{:.1f}"),
                            ("real tokens a step", "real_tokens_per_step", "{:.0f}"),
                            ("computed tokens a step", "computed_tokens_per_step", "{:.0f}"),
                            ("wall µs per real token", "wall_us_per_real_token", "{:.1f}")):
        lines.append(f"| {label} | " + " | ".join(
            f"{fmt.format(cases[n][key])} | " for n in names) + " |")
    if any("primitives" in cases[n] for n in names):
        for label, key, fmt in (
                ("oneDNN primitives created in one epoch", "created", "{:.0f}"),
                ("… their seconds (oneDNN's count)", "created_seconds", "{:.2f}"),
                ("… ms a profiled step", "created_ms_per_profiled_step", "{:.1f}")):
            lines.append(f"| {label} | " + " | ".join(
                f"{fmt.format(cases[n]['primitives'][key])} | " if cases[n].get("primitives")
                else "– | " for n in names) + " |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("gpt2", "tiny"), default="gpt2")
    parser.add_argument("--steps", type=int, default=PROFILED_STEPS)
    parser.add_argument("--cases", nargs="+", default=["spamlora", "peer-tuned"],
                        choices=("spamlora", "spamlora-padded", "spamlora-grouped",
                                 "peer-tuned"))
    parser.add_argument("--out", type=Path, help="the JSON report (default: results/)")
    parser.add_argument("--readme", action="store_true",
                        help="write the table into benchmarks/README.md")
    parser.add_argument("--primitives", action="store_true",
                        help="also count the oneDNN primitives each case creates in one "
                             "epoch (one more training process a case)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-epoch", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dirs", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(profile_case(args.child, *args.dirs, args.steps)))
        return
    if args.child_epoch:
        train_one_epoch(args.child_epoch, *args.dirs, args.limit)
        return

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        data_dir, model_dir = train_speed.prepare(Path(tmp), args.size)
        train_messages = len(train_speed.load_split(data_dir, "train", None))
        cases = {}
        for case in args.cases:
            cases[case] = json.loads(child_output(
                case, "--child", case, "--dirs", str(data_dir), str(model_dir), "--steps",
                str(args.steps)).strip().splitlines()[-1])
            if args.primitives:
                cases[case]["primitives"] = primitives(case, data_dir, model_dir, args.steps)
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "cpu": cpu_name(),
              "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "size": args.size, "steps": args.steps,
              "train_messages": train_messages, "batch": train_speed.BATCH, "cases": cases,
              **{key: value for key, value in train_speed.cpu_description().items()
                 if key == "isa_caps"}}
    out = args.out or train_speed.RESULTS / f"profile_step-{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8", newline="\n")
    table = markdown(report)
    print(table)
    if args.readme:
        text = README.read_text(encoding="utf-8")
        start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
        README.write_text(text[:start] + "\n" + table + text[end:], encoding="utf-8",
                          newline="\n")


if __name__ == "__main__":
    main()
