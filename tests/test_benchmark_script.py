"""The benchmark script runs end to end (a smoke run on a tiny model: no timing checks;
speed is measured by `make bench`, never by tests)."""

import json
import subprocess
import sys

import pytest

from .conftest import REPO, SMS_FILE


@pytest.mark.e2e
def test_benchmark_smoke_run(tmp_path):
    if not SMS_FILE.is_file() and not (REPO / "data" / "train.csv").is_file():
        pytest.skip("the benchmark needs the real SMS data")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_speed.py"),
                           "--size", "tiny", "--limit", "24", "--seeds", "123", "1",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {"spamlora", "spamlora-grouped", "peer-default", "peer-tuned",
                            "inference", "bf16-vs-fp32"}
    for case in ("spamlora", "spamlora-grouped", "peer-default", "peer-tuned"):
        assert results[case]["examples"] == 24
        assert results[case]["examples_per_s"] > 0 and results[case]["peak_rss_mb"] > 0
    assert results["inference"]["predict_messages"] == 48
    assert set(results["bf16-vs-fp32"]["max_abs_diff"]) == {"train_loss", "val_loss",
                                                           "val_accuracy"}
    assert isinstance(results["bf16-vs-fp32"]["within_tolerance"], bool)
    assert set(report["summary"]) == {"speedup_vs_spamlora-grouped",
                                      "speedup_vs_peer-default", "speedup_vs_peer-tuned"}
    accuracy = report["accuracy"]
    assert set(accuracy) == {"spamlora", "spamlora-grouped", "peer-tuned"}
    for row in accuracy.values():
        assert row["seeds"] == [123, 1] and len(row["val_accuracy"]) == 2
        assert row["min"] <= row["mean"] <= row["max"]
    # Seed 123 of the accuracy table is the speed run itself, not a second one.
    assert accuracy["spamlora"]["val_accuracy"][0] == results["spamlora"]["val_accuracy"]
    assert {"cpu", "cpu_flags"} <= set(report)  # the table names the CPU


def test_the_epoch_ratio_is_the_median_over_the_seeds(monkeypatch):
    """One slow process (a busy moment of a shared machine) must not set the ratio: the
    seeds' epochs are the same work, so their median is used; one seed gives none."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from train_speed import median_epochs

    assert median_epochs({"spamlora": {"train_seconds": [60.0, 51.0, 52.0, 51.0]},
                          "peer-tuned": {"train_seconds": [92.0, 90.0, 96.0, 95.0]},
                          "spamlora-grouped": {"train_seconds": [49.0]}}) == {
        "spamlora": 51.5, "peer-tuned": 93.5}


def test_a_capped_run_says_so(monkeypatch):
    """A run with the CPU capped to stand in for a smaller one (AVX2) records the caps,
    and its tables' header says them: read without, it would pass for this CPU's own."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from train_speed import ISA_CAPS, capped, cpu_description

    for var in ISA_CAPS:
        monkeypatch.delenv(var, raising=False)
    assert "isa_caps" not in cpu_description() and capped(cpu_description()) == ""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    report = cpu_description()
    assert report["isa_caps"] == {"ONEDNN_MAX_CPU_ISA": "AVX2",
                                  "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert capped(report) == (", capped by `ONEDNN_MAX_CPU_ISA=AVX2` "
                              "`MKL_ENABLE_INSTRUCTIONS=AVX2`")


@pytest.mark.e2e
def test_modes_smoke_run(tmp_path):
    """--modes: each `train.trainable` mode, two epochs where the frozen part is kept."""
    if not SMS_FILE.is_file() and not (REPO / "data" / "train.csv").is_file():
        pytest.skip("the benchmark needs the real SMS data")
    out = tmp_path / "modes.json"
    readme = (REPO / "benchmarks" / "README.md").read_bytes()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_speed.py"),
                           "--size", "tiny", "--limit", "24", "--modes", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert list(results) == ["lora", "last_block", "last_two_blocks", "last_layer", "all"]
    for mode, r in results.items():
        assert r["mode"] == mode and r["examples"] == 24
        assert len(r["epoch_train_seconds"]) == r["epochs"] == len(
            r["epoch_validation_seconds"])
    # The tiny model has two blocks: `last_two_blocks` leaves none frozen.
    assert {m: (r["epochs"], r["cache_mb"] > 0) for m, r in results.items()} == {
        "lora": (1, False), "last_block": (2, True), "last_two_blocks": (2, False),
        "last_layer": (2, True), "all": (1, False)}
    assert report["cpu"] and report["last_block_later_epoch_speedup_vs_lora"] > 0
    assert "| last_block |" in proc.stdout
    assert (REPO / "benchmarks" / "README.md").read_bytes() == readme  # --out: no edit


@pytest.mark.e2e
def test_serve_load_smoke_run(tmp_path):
    if not SMS_FILE.is_file() and not (REPO / "data" / "train.csv").is_file():
        pytest.skip("the benchmark needs the real SMS data")
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve_load.py"),
                           "--size", "tiny", "--requests", "6", "--seconds", "5",
                           "--pairs", "3", "--server-timeout", "90", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    cases = {(c["clients"], c["size"]): c for c in report["served"]}
    assert set(cases) == {(c, s) for c in (1, 4, 16) for s in (1, 64)}
    for case in cases.values():
        assert case["ok"] + case["errors"] + case["timeouts"] == case["requests"] > 0
        assert case["errors"] == 0 and case["p50_ms"] > 0
    assert report["in_process"]["size_64"]["messages_per_s"] > 0
    assert report["server_timeout"] == 90 and report["paired"]["pairs"] == 3
    assert (report["verdict"]["http_overhead_p50_ms"]
            == report["paired"]["overhead_p50_ms"])
    assert set(report["verdict"]) == {"http_overhead_p50_ms", "overhead_ok",
                                      "throughput_ratio_4_clients", "throughput_ok",
                                      "clean_at_16_clients"}


@pytest.mark.e2e
def test_rank_sweep_smoke_run(tmp_path):
    if not SMS_FILE.is_file() and not (REPO / "data" / "train.csv").is_file():
        pytest.skip("the benchmark needs the real SMS data")
    out = tmp_path / "sweep.json"
    readme = (REPO / "benchmarks" / "README.md").read_bytes()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_speed.py"),
                           "--size", "tiny", "--limit", "24", "--ranks", "2", "4",
                           "--seeds", "123", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ranks"] == [2, 4] and report["seeds"] == [123]
    assert set(report["table"]) == {"textbook", "reference"}
    for by_rank in report["table"].values():
        assert set(by_rank) == {"2", "4"}  # JSON keys
        assert by_rank["2"]["trainable"] < by_rank["4"]["trainable"]
        for row in by_rank.values():
            assert len(row["val_accuracy"]) == 1 and 0 <= row["mean"] <= 1
    assert "| 4 |" in proc.stdout  # the table it prints
    assert (REPO / "benchmarks" / "README.md").read_bytes() == readme  # --out: no edit


@pytest.mark.e2e
def test_profile_step_smoke_run(tmp_path):
    """benchmarks/profile_step.py splits both trainings' steps by part: every part a step
    must have is found in each (a profiler event put in the wrong part would leave one
    empty), and the GEMMs get a ceiling. The padded case trains on the same messages a
    step as the packed one, and computes more tokens for them. --primitives reads a
    whole epoch's steps from its second process's output."""
    if not SMS_FILE.is_file() and not (REPO / "data" / "train.csv").is_file():
        pytest.skip("the benchmark needs the real SMS data")
    out = tmp_path / "profile.json"
    readme = (REPO / "benchmarks" / "README.md").read_bytes()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "profile_step.py"),
                           "--size", "tiny", "--steps", "2", "--out", str(out),
                           "--cases", "spamlora", "spamlora-padded", "peer-tuned",
                           "--primitives"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["cases"]) == {"spamlora", "spamlora-padded", "peer-tuned"}
    packed, padded = report["cases"]["spamlora"], report["cases"]["spamlora-padded"]
    assert padded["real_tokens_per_step"] == packed["real_tokens_per_step"]
    assert padded["computed_tokens_per_step"] > packed["computed_tokens_per_step"]
    for case in report["cases"].values():
        parts = case["parts"]
        for part in ("frozen GEMM forward", "frozen GEMM input-grad", "LoRA products",
                     "head", "attention", "GELU", "LayerNorm", "optimizer"):
            assert parts[part]["ms"] > 0, part
        for part in ("frozen GEMM forward", "frozen GEMM input-grad", "LoRA products"):
            assert parts[part]["gflops"] > 0 and parts[part]["ceiling_gflops"] > 0, part
        assert case["computed_tokens_per_step"] >= case["real_tokens_per_step"] > 0
        assert case["wall_ms_per_step"] > 0
        created = case["primitives"]
        if created is not None:  # None where oneDNN ran no product (fp32 on some CPUs)
            assert created["epoch_steps"] == -(-report["train_messages"] // report["batch"])
        if case["precision"] == "bfloat16":  # oneDNN computes every bf16 product
            assert created["created"] > 0 and created["created_seconds"] > 0
    assert "| frozen GEMM forward |" in proc.stdout
    assert "| oneDNN primitives created in one epoch |" in proc.stdout
    assert (REPO / "benchmarks" / "README.md").read_bytes() == readme  # no --readme: no edit


def test_profile_step_counts_the_primitives_each_step_created():
    """Each cache miss oneDNN reports goes to the step it came before the marker of;
    cache hits, other lines and what follows the last step are not counted."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import profile_step
    finally:
        sys.path.remove(str(REPO / "benchmarks"))

    def created(ms):
        return (f"onednn_verbose,v1,primitive,create:cache_miss,cpu,matmul,brg_matmul:avx2,"
                f"undef,src:bf16::blocked:ab::f0,,8x768:768x24,{ms}")

    hit = created(0.5).replace("cache_miss", "cache_hit")
    mark = profile_step.STEP_MARK
    verbose = "\n".join(["onednn_verbose,v1,info,oneDNN v3.12.0", created(2.0), hit, mark,
                         mark, created(1.5), created(0.25), "a log line", mark,
                         created(9.0)])
    assert profile_step.creation_by_step(verbose) == [[2.0], [], [1.5, 0.25]]
    assert profile_step.creation_by_step(f"{mark}\n{mark}\n") is None
