"""Shared fixtures: real data from ../shared/data when present, a loopback HTTP server,
and tiny GPT-2 folders written by `transformers.save_pretrained`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
SMS_ZIP = SHARED / "sms_spam" / "smsspamcollection.zip"
SMS_FILE = SHARED / "sms_spam" / "SMSSpamCollection"
BPE_DIR = SHARED / "gpt2_bpe"


# The modules that take longest (seconds in `make test` on the AMX Xeon, 2026-12-08:
# ~280, ~145, ~130, ~120, ~60, ~40, ~30), collected first: `make test` hands whole modules
# to two workers in collection order, and a long module picked up last would leave one
# worker idle.
LONGEST_FIRST = ("test_pipeline", "test_tracking", "test_benchmark_script", "test_resume",
                 "test_mlflow_model", "test_distributed", "test_cli")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def place(item: pytest.Item) -> int:
        name = item.path.stem
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=place)  # stable: the order within a module is kept


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory) -> Iterator[Path]:
    """`XDG_CACHE_HOME` in a temporary folder for the whole session: the tests never
    write the user's cache (spamlora's file digests and base models), nor read it."""
    cache = tmp_path_factory.mktemp("xdg_cache")
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    yield cache
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


@pytest.fixture
def sms_zip() -> Path:
    if not SMS_ZIP.is_file():
        pytest.skip(f"{SMS_ZIP} not present (real dataset; see ../shared/data/README.md)")
    return SMS_ZIP


@pytest.fixture
def sms_file() -> Path:
    if not SMS_FILE.is_file():
        pytest.skip(f"{SMS_FILE} not present (real dataset; see ../shared/data/README.md)")
    return SMS_FILE


@pytest.fixture
def gpt2_bpe() -> Path:
    if not (BPE_DIR / "encoder.json").is_file():
        pytest.skip(f"{BPE_DIR} not present (GPT-2 BPE files)")
    return BPE_DIR


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (from its encoder.py)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_tokenizer_files(folder: Path) -> int:
    """GPT-2's real vocab.json / merges.txt when ../shared has them, else a byte-level
    stand-in (256 byte tokens, no merges, `<|endoftext|>` = 256). Returns the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    if (BPE_DIR / "encoder.json").is_file():
        shutil.copy(BPE_DIR / "encoder.json", folder / "vocab.json")
        shutil.copy(BPE_DIR / "vocab.bpe", folder / "merges.txt")
        return 50257
    mapping = _bytes_to_unicode()
    vocab = {mapping[b]: i for i, b in enumerate(sorted(mapping, key=lambda b: ord(mapping[b])))}
    vocab["<|endoftext|>"] = 256
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return 257


def make_hf_gpt2(folder: Path, *, n_embd: int = 32, n_layer: int = 2, n_head: int = 2,
                 n_positions: int = 256, seed: int = 0, tokenizer: bool = True,
                 vocab_size: int | None = None) -> Path:
    """A randomly initialised GPT-2 saved by `transformers` (prefixed tensor names, no
    `lm_head.weight`), with tokenizer files."""
    import torch
    import transformers

    size = write_tokenizer_files(folder) if tokenizer else 50257
    config = transformers.GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                                     n_positions=n_positions, vocab_size=vocab_size or size)
    torch.manual_seed(seed)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder


def cpu_build() -> tuple[str, str, str]:
    """What fp32 results depend on bit for bit: torch's build, ATen's CPU capability and
    the CPU's vendor (MKL and oneDNN take other code paths on AMD and Intel)."""
    import platform

    import torch

    vendor = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    return torch.__version__, torch.backends.cpu.get_cpu_capability(), vendor


HOUR_NS = 3600 * 10**9


def downloaded(source: Path, dest: Path) -> Path:
    """`source` fetched into `dest` as download_model does (with its download.json),
    its files dated an hour back: written long before they are read, as usual."""
    from spamlora.weights import fetch_model

    fetch_model("gpt2", str(source), dest, timeout=5, retries=0, revision="main",
                sha256=None)
    for file in dest.iterdir():
        st = file.stat()
        os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns - HOUR_NS))
    return dest


def flip_bytes(path: Path, keep_mtime: bool = False) -> None:
    """64 bytes in the middle of `path` inverted in place: same size, same inode; with
    `keep_mtime`, its modification time set back to what it was."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        data = f.read(64)
        f.seek(st.st_size // 2)
        f.write(bytes(b ^ 0xFF for b in data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    new = path.stat()
    assert (new.st_size, new.st_ino) == (st.st_size, st.st_ino)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return make_hf_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def adapter(tmp_path_factory, tiny_gpt2):
    """A classifier adapter on `tiny_gpt2` with non-zero LoRA, as after training."""
    import torch

    from spamlora.adapter import AdapterSpec, save_adapter
    from spamlora.classifier import build_classifier
    from spamlora.lora import LinearWithLoRA
    from spamlora.weights import load_gpt2

    folder = tmp_path_factory.mktemp("adapter")
    base = load_gpt2(tiny_gpt2)
    spec = AdapterSpec("gpt2", base.cfg, rank=4, alpha=4, max_length=12, pad_id=50256
                       if base.cfg.vocab_size == 50257 else 256)
    model = build_classifier(base, spec, seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LinearWithLoRA):
                m.lora.B.normal_(std=0.3)
        model.out_head.weight.normal_(std=2.0)
    save_adapter(model, spec, folder / "adapter.safetensors")
    return folder / "adapter.safetensors"


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    fail_times: int = 0  # answer the first N requests with `fail_status`...
    fail_status: int = 500
    drop_after: int | None = None  # ...or send only this many bytes, then hang up
    hits: int = 0


@dataclass
class LocalServer:
    """An HTTP server on 127.0.0.1 with an ephemeral port; routes set by the test."""
    base_url: str
    routes: dict[str, Route] = field(default_factory=dict)

    def serve(self, path: str, body: bytes = b"", **kw) -> str:
        self.routes[path] = Route(body=body, **kw)
        return self.base_url + path

    def serve_dir(self, prefix: str, folder: Path) -> str:
        for f in folder.iterdir():
            if f.is_file():
                self.serve(f"{prefix}/{f.name}", f.read_bytes())
        return self.base_url + prefix


@contextlib.contextmanager
def local_server() -> Iterator[LocalServer]:
    server_ref: dict[str, LocalServer] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def do_GET(self):  # noqa: N802 (http.server's naming)
            route = server_ref["s"].routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            route.hits += 1
            if route.hits <= route.fail_times or route.status != 200:
                self.send_error(route.fail_status if route.hits <= route.fail_times
                                else route.status)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            if route.drop_after is not None:
                self.wfile.write(route.body[: route.drop_after])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(route.body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_ref["s"] = LocalServer(f"http://127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server_ref["s"]
    finally:
        httpd.shutdown()
        httpd.server_close()


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago, for a server started in a
    subprocess (an in-process one binds port 0 itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_server() -> Iterator[LocalServer]:
    with local_server() as server:
        yield server


def sms_lines(n_ham: int = 30, n_spam: int = 20) -> str:
    """A small stand-in SMS Spam Collection (spam has tell-tale words)."""
    ham = [f"hey are we still meeting at {i} pm, see you soon" for i in range(n_ham)]
    spam = [f"WINNER! claim your FREE prize {i} now, txt CLAIM to 8{i:04d}"
            for i in range(n_spam)]
    lines = [f"ham\t{t}" for t in ham] + [f"spam\t{t}" for t in spam]
    return "\n".join(lines) + "\n"


def dataset_zip_bytes() -> bytes:
    """The real SMS Spam Collection zip when ../shared has it, else a stand-in."""
    if SMS_ZIP.is_file():
        return SMS_ZIP.read_bytes()
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("SMSSpamCollection", sms_lines(200, 80))
    return buffer.getvalue()


@pytest.fixture
def make_zip(tmp_path) -> Callable[..., Path]:
    import zipfile

    def make(members: dict[str, str | bytes], name: str = "sms.zip") -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as z:
            for member, content in members.items():
                z.writestr(member, content)
        return path

    return make
