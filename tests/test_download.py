"""The download helper against a real HTTP server on 127.0.0.1 (ephemeral port)."""

import hashlib
import json

import pytest

from spamlora.data import DataError, fetch_dataset
from spamlora.download import DownloadError, download

from .conftest import sms_lines

BODY = b"x" * 300_000  # several read chunks' worth


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(urls, dest, **kw):
    kw.setdefault("retries", 2)
    return download(urls, dest, timeout=5, backoff=0, **kw)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_good_download_records_hash_and_size(http_server, tmp_path):
    url = http_server.serve("/f.bin", BODY)
    got = fetch([url], tmp_path / "f.bin", sha256=sha(BODY))
    assert (tmp_path / "f.bin").read_bytes() == BODY
    assert (got.url, got.sha256, got.bytes) == (url, sha(BODY), len(BODY))
    assert leftovers(tmp_path) == ["f.bin"]


def test_sha256_mismatch_leaves_nothing(http_server, tmp_path):
    url = http_server.serve("/f.bin", BODY)
    with pytest.raises(DownloadError, match="does not match the expected"):
        fetch([url], tmp_path / "f.bin", sha256="0" * 64)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("status, hits", [(404, 1), (500, 3)])
def test_http_errors(http_server, tmp_path, status, hits):
    url = http_server.serve("/f.bin", BODY, status=status)
    with pytest.raises(DownloadError, match=f"HTTP {status}"):
        fetch([url], tmp_path / "f.bin")
    # 404 is final; a server error is retried (1 + 2 retries).
    assert http_server.routes["/f.bin"].hits == hits
    assert leftovers(tmp_path) == []


def test_server_error_then_success_is_retried(http_server, tmp_path):
    url = http_server.serve("/f.bin", BODY, fail_times=2)
    got = fetch([url], tmp_path / "f.bin")
    assert got.bytes == len(BODY) and http_server.routes["/f.bin"].hits == 3


def test_connection_dropped_mid_body_is_retried_then_fails_cleanly(http_server, tmp_path):
    url = http_server.serve("/f.bin", BODY, drop_after=100_000)
    with pytest.raises(DownloadError, match=r"f\.bin.*after 3 tries"):
        fetch([url], tmp_path / "f.bin")
    assert http_server.routes["/f.bin"].hits == 3
    assert leftovers(tmp_path) == []


def test_first_mirror_failing_and_second_working(http_server, tmp_path):
    bad = http_server.serve("/bad.bin", status=404)
    down = http_server.serve("/down.bin", BODY, drop_after=10)
    good = http_server.serve("/good.bin", BODY)
    got = fetch([bad, down, good], tmp_path / "f.bin")
    assert got.url == good and (tmp_path / "f.bin").read_bytes() == BODY


def test_file_url_and_plain_path(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(BODY)
    out = tmp_path / "out"
    out.mkdir()
    assert fetch([src.as_uri()], out / "a").sha256 == sha(BODY)
    assert fetch([str(src)], out / "b").bytes == len(BODY)
    with pytest.raises(DownloadError, match="No such file"):
        fetch([str(tmp_path / "missing.zip")], out / "c")
    assert leftovers(out) == ["a", "b"]


def test_unreachable_host_is_a_clear_error(tmp_path):
    # Port 9 on loopback: nothing listens there.
    with pytest.raises(DownloadError, match="127.0.0.1:9"):
        fetch(["http://127.0.0.1:9/f.bin"], tmp_path / "f.bin", retries=0)


def test_dataset_zip_is_fetched_extracted_and_recorded(http_server, tmp_path, make_zip):
    content = sms_lines()
    url = http_server.serve("/sms.zip", make_zip({"SMSSpamCollection": content,
                                                  "readme": "x"}).read_bytes())
    dest = tmp_path / "raw"
    got = fetch_dataset([url], dest, "sms.zip", "SMSSpamCollection", "download.json",
                        sha256=None, timeout=5, retries=0)
    assert (dest / "SMSSpamCollection").read_text() == content
    assert json.loads((dest / "download.json").read_text()) == got.as_dict()


def test_real_dataset_zip(http_server, tmp_path, sms_zip):
    url = http_server.serve("/sms+spam+collection.zip", sms_zip.read_bytes())
    dest = tmp_path / "raw"
    got = fetch_dataset([url], dest, "z.zip", "SMSSpamCollection", "download.json",
                        sha256="1587ea43e58e82b14ff1f5425c88e17f8496bfcdb67a583dbff9eefaf9963ce3",
                        timeout=5, retries=0)
    assert got.bytes == 203415
    assert sha((dest / "SMSSpamCollection").read_bytes()) == (
        "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d")


def test_zip_without_the_messages_file_leaves_no_output(http_server, tmp_path, make_zip):
    url = http_server.serve("/sms.zip", make_zip({"readme": "x"}).read_bytes())
    with pytest.raises(DataError, match="holds no SMSSpamCollection"):
        fetch_dataset([url], tmp_path / "raw", "sms.zip", "SMSSpamCollection",
                      "download.json", sha256=None, timeout=5, retries=0)
    assert [p for p in leftovers(tmp_path) if "raw" in p] == []


def test_not_a_zip(http_server, tmp_path):
    url = http_server.serve("/sms.zip", b"<html>not a zip</html>")
    with pytest.raises(DataError, match="not a valid zip"):
        fetch_dataset([url], tmp_path / "raw", "sms.zip", "SMSSpamCollection",
                      "download.json", sha256=None, timeout=5, retries=0)
    assert leftovers(tmp_path) == []
