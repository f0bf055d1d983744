"""Which device and number format a run uses, and the contexts that apply them."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .model import GPTModel


def resolve_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first CPU in a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def onednn_cap() -> str | None:
    """The instruction set `ONEDNN_MAX_CPU_ISA` caps oneDNN at, upper-cased; None where
    it sets no cap."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return None if cap in ("", "ALL", "DEFAULT") else cap


def onednn_capped_below_bf16() -> bool:
    """Whether `ONEDNN_MAX_CPU_ISA` keeps oneDNN off this CPU's bf16 instructions (AVX2,
    AVX512_CORE, ...): it then emulates bf16, more slowly than it computes fp32."""
    cap = onednn_cap()
    return cap is not None and not any(part in cap for part in ("BF16", "AMX", "FP16",
                                                                "AVX10"))


def cpu_computes_fp32_with_avx512() -> bool:
    """Whether ATen and oneDNN compute fp32 with AVX-512 here: the CPU has it and
    neither `ATEN_CPU_CAPABILITY` nor `ONEDNN_MAX_CPU_ISA` caps them below it."""
    cap = onednn_cap()
    if cap is not None and not cap.startswith(("AVX512", "AVX10")):
        return False
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AMX or AVX-512-BF16) that oneDNN may use.
    torch answers through private functions; where a torch release lacks them, Linux's
    /proc/cpuinfo does, and elsewhere the answer is no (fp32: slower at worst, never
    wrong)."""
    if onednn_capped_below_bf16():
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported",
                                                          "_is_avx512_bf16_supported")]
    if all(callable(probe) for probe in probes):
        return any(probe() for probe in probes)
    try:
        flags = cpu_flags(CPUINFO.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return False
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """bf16 autocast where the hardware computes bf16 natively, else fp32."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_computes_bf16():
        return torch.bfloat16
    return torch.float32


def run_facts(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """What a result depends on besides params and data: written into the DVC metrics,
    so `dvc metrics diff` shows when two results came from other hardware or precision."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
    return {"device": device.type, "hardware": hardware,
            "precision": str(dtype).removeprefix("torch."), "torch": torch.__version__}


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=dtype == torch.bfloat16)


# cuDNN's attention builds an execution plan for every new shape, and packed SMS batches
# bring a new width nearly every step: measured on an H200 (GPT-2 124M, bf16, packed
# batches of 8) 0.315 s a step with it among the candidates, 0.036 s without it
# (benchmarks/README.md). fp32 never takes it. The memory-efficient kernel takes masks.
CUDA_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                  SDPBackend.MATH]


def attention_kernels(device: torch.device, training: bool):
    """The attention kernels to use. On CPU for training, the plain "math" kernel: for
    SMS-length sequences the CPU flash-attention kernel's backward took ~20% of a step,
    the math kernel a fraction of that, and it is deterministic; inference keeps the
    default, whose forward is faster (benchmarks/README.md). On CUDA every kernel but
    cuDNN's (`CUDA_ATTENTION`); results there are not bitwise reproducible run to run
    (docs/training.md)."""
    if device.type == "cpu":
        return sdpa_kernel([SDPBackend.MATH]) if training else contextlib.nullcontext()
    if device.type == "cuda":
        return sdpa_kernel(CUDA_ATTENTION)
    return contextlib.nullcontext()


def cast_frozen_linears(model: GPTModel, dtype: torch.dtype) -> GPTModel:
    """Store every frozen Linear in `dtype`, in place. Under bf16 autocast a Linear's
    weight and bias are cast to bf16 at every call anyway, so this changes no result and
    saves that copy on every step and half the weights' memory. Trainable parameters
    (LoRA, head) stay fp32: they are the master weights the optimizer updates."""
    if dtype == torch.float32:
        return model
    for module in model.modules():
        if isinstance(module, nn.Linear) and not any(p.requires_grad
                                                     for p in module.parameters()):
            module.to(dtype)
    return model
