"""GPT-2 as a sequence classifier (LoRA, or some of its own weights, trained): build it,
load it with its adapter, summarise it."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .adapter import (
    AdapterError,
    AdapterSpec,
    classifier_shapes,
    is_trained,
    read_adapter,
    tensors_digest,
)
from .lora import replace_linear_with_lora
from .model import GPTConfig, GPTModel
from .presets import TRAINABLE
from .weights import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    WeightsError,
    base_fingerprint,
    load_gpt2,
    read_config,
    uninitialised,
)

log = logging.getLogger(__name__)


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def add_lora(model: GPTModel, spec: AdapterSpec, seed: int) -> GPTModel:
    """Freeze `model` and inject LoRA (seeded), in place; the LM head is untouched."""
    freeze(model)
    torch.manual_seed(seed)
    return replace_linear_with_lora(model, spec.rank, spec.alpha, spec.targets, spec.dropout,
                                    spec.init)


def swap_head(model: GPTModel, num_classes: int, seed: int) -> GPTModel:
    """Replace the LM head with a trainable `Linear(emb_dim, num_classes)` (seeded)."""
    torch.manual_seed(seed)
    model.out_head = nn.Linear(model.cfg.emb_dim, num_classes).to(model.tok_emb.weight.device)
    return model


def random_base(cfg: GPTConfig, seed: int) -> tuple[GPTModel, str]:
    """A GPT-2 of shape `cfg` initialised as the book's GPTModel initialises itself
    (`--weights random`): PyTorch's module defaults after `torch.manual_seed(seed)`, on
    the CPU; and the digest of its parameters, which tells whether another PyTorch
    release rebuilt the same base. The caller's random generator is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTModel(cfg)
    return model.eval(), tensors_digest(dict(model.named_parameters()))


def check_base(spec: AdapterSpec, cfg: GPTConfig, weights: object = "the base model",
               adapter: object = "the adapter") -> None:
    if cfg.with_dropout(0.0) != spec.base_config.with_dropout(0.0):
        raise AdapterError(f"{adapter} was made for a base model with config "
                           f"{spec.base_config}, but {weights} has {cfg}")


def build_classifier(base: GPTModel, spec: AdapterSpec, seed: int) -> GPTModel:
    """The classifier before training, in place: `base` with a new head, LoRA where
    `spec.trainable` is `lora`, exactly the parameters that mode trains requiring grad,
    and `spec.token` the hidden state it reads."""
    check_base(spec, base.cfg)
    if spec.trainable == "lora":
        add_lora(base, spec, seed)
    model = swap_head(freeze(base), spec.num_classes, seed)
    for name, p in model.named_parameters():
        p.requires_grad_(is_trained(name, spec.trainable, model.cfg.n_layers))
    model.token = spec.token
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total). Tied tensors count once per module, as the textbook model,
    whose output head is its own matrix, counts them."""
    params = [p for _, p in model.named_parameters(remove_duplicate=False)]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def load_classifier(weights: str | Path, adapter: str | Path, strict: bool = False,
                    base_sha256: dict[str, str] | None = None) -> tuple[GPTModel, AdapterSpec]:
    """The trained classifier: the base GPT-2 folder `weights` with the adapter applied.
    The (small) adapter is read and checked first, so a bad one fails before the base
    loads. The base's files are checked against its download.json (`base_fingerprint`:
    a damaged one is an error; `strict` hashes every file in full rather than trusting
    digests cached by size, mtime and inode). A base whose files differ from those the
    adapter was trained on (same shape, other weights) gets a warning naming the file,
    or with `strict` an error; `base_sha256`: the folder's file hashes where the caller
    has just verified them (then nothing is hashed here). An adapter of every weight
    reads only the folder's config (and the caller its tokenizer); one on a random base
    rebuilds it from its seed, refused unless it has the digest recorded at training.
    The caller's random generator is left as it was."""
    spec, tensors = read_adapter(adapter)
    if not (Path(weights) / CONFIG_FILE).is_file():
        raise WeightsError(f"{weights}: no GPT-2 base model here; this adapter needs "
                           f"{spec.base_model!r}: fetch it with `spamlora download-model "
                           f"--name {spec.base_model} {weights}`")
    cfg = read_config(weights)
    check_base(spec, cfg, weights, adapter)
    # An adapter of every weight, or one on a random base, needs the base's config and
    # tokenizer, not its weights.
    files = (CONFIG_FILE, WEIGHTS_FILE) if spec.reads_base_weights else (CONFIG_FILE,)
    found = base_sha256 or base_fingerprint(weights, files, strict=strict)
    if spec.base_sha256:
        for name, want in sorted(spec.base_sha256.items()):
            if name not in files:
                continue
            if found.get(name) != want:
                message = (f"{Path(weights) / name} has sha256 {found.get(name)}, but "
                           f"{adapter} was trained on a base whose {name} has {want}")
                if strict:
                    raise AdapterError(message)
                log.warning("%s: predictions may be off", message)
    if spec.trainable == "all":  # every parameter comes from the adapter
        with uninitialised():
            base = GPTModel(cfg)
    elif spec.weights == "random":
        base, digest = random_base(cfg, spec.base_seed)
        if digest != spec.random_sha256:
            raise AdapterError(
                f"{adapter} was trained on a random base (seed {spec.base_seed}) whose "
                f"weights had sha256 {spec.random_sha256}; rebuilt here they have "
                f"{digest}: this PyTorch ({torch.__version__}) initialises modules "
                f"otherwise than the one that trained it")
    else:
        base = load_gpt2(weights)
    with torch.random.fork_rng(devices=[]):  # building draws LoRA's A, then overwritten
        model = build_classifier(base, spec, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(tensors[name])
    return model, spec


@dataclass(frozen=True)
class ParameterCounts:
    lm_trainable: int  # the language model (LoRA-adapted for `lora`), before the head swap
    lm_total: int
    trainable: int  # the classifier: what its mode trains, the new head included
    total: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def parameter_counts(classifier: GPTModel) -> ParameterCounts:
    """Counts of the classifier and of the LM it was made from. The swap only changed the
    head, so the LM's figures follow: less the new head, plus the LM head, which the
    textbook model (and so the seed's 164,364,288) counts as its own matrix, trained
    where the token embedding it is tied to is."""
    trainable, total = count_parameters(classifier)
    head = sum(p.numel() for p in classifier.out_head.parameters())
    lm_head = classifier.cfg.vocab_size * classifier.cfg.emb_dim
    lm_head_trained = lm_head if classifier.tok_emb.weight.requires_grad else 0
    return ParameterCounts(trainable - head + lm_head_trained, total - head + lm_head,
                           trainable, total)


def counts_by_mode(spec: AdapterSpec) -> dict[str, tuple[int, int]]:
    """(trainable, total) of the classifier `spec` describes, in every `train.trainable`
    mode, from its shapes alone (no model is built); LoRA's matrices add to the total."""
    def size(shapes: dict[str, tuple[int, ...]]) -> int:
        return sum(math.prod(shape) for shape in shapes.values())

    total = size(classifier_shapes(spec.base_config, spec.num_classes))
    head = spec.num_classes * (spec.base_config.emb_dim + 1)
    counts = {}
    for mode in TRAINABLE:
        trained = size(replace(spec, trainable=mode).tensor_shapes())
        counts[mode] = (trained, total + (trained - head if mode == "lora" else 0))
    return counts


def format_counts_by_mode(counts: dict[str, tuple[int, int]]) -> str:
    lines = [f"{'train.trainable':32}{'trainable':>14}{'total':>16}{'fraction':>10}"]
    lines += [f"{mode:32}{t:>14,}{n:>16,}{t / n:>10.2%}" for mode, (t, n) in counts.items()]
    return "\n".join(lines)


def format_summary(classifier: GPTModel, counts: ParameterCounts) -> str:
    """The model's structure (the first block in full) and its parameter table."""
    lines = [f"{type(classifier).__name__}("]
    for name, module in classifier.named_children():
        if name == "trf_blocks":
            n = len(module)
            first = repr(module[0]).replace("\n", "\n    ")
            lines.append(f"  (trf_blocks): {n} x TransformerBlock, each like block 0:")
            lines.append(f"    (0): {first}")
            if n > 1:
                lines.append(f"    (1-{n - 1}): {n - 1} more, same structure")
        else:
            lines.append(f"  ({name}): {module!r}".replace("\n", "\n  "))
    lines.append(")")
    lora = any(name.endswith(".lora.A") for name, _ in classifier.named_parameters())
    rows = [(f"LM{' + LoRA' if lora else ''} (before head swap)", counts.lm_trainable,
             counts.lm_total),
            (f"Classifier ({classifier.out_head.out_features}-class head)",
             counts.trainable, counts.total)]
    lines += ["", f"{'':32}{'trainable':>14}{'total':>16}{'fraction':>10}"]
    lines += [f"{label:32}{t:>14,}{n:>16,}{t / n:>10.2%}" for label, t, n in rows]
    return "\n".join(lines)
