"""`precision: auto`: bf16 where the hardware computes it, decided without relying on
torch's private CPU probes alone."""

import pytest
import torch

from spamlora import precision
from spamlora.precision import cpu_flags, resolve_precision, run_facts

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse2 avx2 avx512f avx512bw amx_bf16 amx_tile
processor\t: 1
"""


def test_explicit_choices_win():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == torch.float32
    assert resolve_precision("bf16", cpu) == torch.bfloat16


def test_cpu_flags_are_read_from_cpuinfo():
    assert {"avx2", "amx_bf16"} <= cpu_flags(CPUINFO)
    assert cpu_flags("processor : 0\n") == set()


def test_auto_falls_back_to_cpuinfo_without_torchs_private_probes(monkeypatch, tmp_path):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # the suite may run capped
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    cpu = torch.device("cpu")
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision, "CPUINFO", info)
    info.write_text(CPUINFO)
    assert resolve_precision("auto", cpu) == torch.bfloat16
    info.write_text(CPUINFO.replace(" amx_bf16", ""))
    assert resolve_precision("auto", cpu) == torch.float32
    info.unlink()  # not Linux: fp32, never a crash
    assert resolve_precision("auto", cpu) == torch.float32


def test_auto_follows_torchs_probes_when_present(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert resolve_precision("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32


def test_run_facts_name_device_precision_and_torch():
    facts = run_facts(torch.device("cpu"), torch.bfloat16)
    assert facts["device"] == "cpu" and facts["precision"] == "bfloat16"
    assert facts["torch"] == torch.__version__
    assert torch.backends.cpu.get_cpu_capability() in facts["hardware"]


@pytest.mark.parametrize("cap, bf16", [("AVX2", False), ("avx512_core", False),
                                       ("AVX512_CORE_BF16", True), ("AVX512_CORE_AMX", True),
                                       ("ALL", True), ("", True)])
def test_auto_respects_a_onednn_cap_below_bf16(monkeypatch, cap, bf16):
    """`ONEDNN_MAX_CPU_ISA=AVX2` on an AMX CPU: oneDNN would emulate bf16, so fp32."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    want = torch.bfloat16 if bf16 else torch.float32
    assert resolve_precision("auto", torch.device("cpu")) == want


@pytest.mark.parametrize("cap, aten, avx512", [
    ("", "AVX512", True), ("ALL", "AVX512", True), ("avx512_core", "AVX512", True),
    ("AVX512_CORE_AMX", "AVX512", True), ("AVX10_1_512", "AVX512", True),
    ("AVX2", "AVX512", False), ("", "AVX2", False), ("AVX2_VNNI_2", "AVX2", False)])
def test_fp32_with_avx512_follows_both_caps(monkeypatch, cap, aten, avx512):
    """Scoring packs fp32 weights only where oneDNN and ATen compute fp32 with AVX-512
    (`packed.can_pack_fp32`): capping either one below it says no."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: aten)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert precision.cpu_computes_fp32_with_avx512() == avx512


@pytest.mark.parametrize("training", [True, False])
def test_cuda_attention_leaves_out_cudnn(training):
    """cuDNN's attention plans every new shape (0.3 s a step on an H200): never chosen.
    The backend switches are process-wide flags, so this needs no GPU."""
    with precision.attention_kernels(torch.device("cuda"), training):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled()
    with precision.attention_kernels(torch.device("cpu"), training):
        assert torch.backends.cuda.math_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() is not training
