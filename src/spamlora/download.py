"""The one download helper: mirrors, timeouts, retries, checksums, atomic placement.

Used for the dataset and for the GPT-2 files. Sources may be http(s) URLs, `file://` URLs
or plain local paths (for air-gapped mirrors).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePath
from urllib.parse import urlparse
from urllib.request import url2pathname

from tqdm import tqdm

from .errors import SpamloraError
from .fileio import atomic_path, ensure_space

log = logging.getLogger(__name__)
CHUNK = 1 << 20
USER_AGENT = "spamlora/0.1"


class DownloadError(SpamloraError, RuntimeError):
    pass


@dataclass(frozen=True)
class Downloaded:
    url: str
    sha256: str
    bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Located(Downloaded):
    """A source as `locate` found it: `path` is where to read it, the local source
    itself (read in place) or the file it was downloaded to."""
    path: str
    in_place: bool


class _Retryable(Exception):
    """A failure worth trying the same source again for (network trouble, HTTP 5xx)."""


URL_SCHEMES = ("http", "https", "file")


def is_url(source: str) -> bool:
    """Whether `source` is a URL we fetch, not a local path. A Windows path's drive
    (`C:\\mirror`) parses as a one-letter scheme: a path."""
    return urlparse(source).scheme in URL_SCHEMES


def to_url(source: str, flavour: type[PurePath] | None = None) -> str:
    """A URL for `source`; plain paths become `file://` URLs (`file:///C:/...` for a
    Windows drive path). `flavour` (e.g. `PureWindowsPath`) reads an absolute path in
    another platform's syntax; by default it is this machine's, resolved."""
    if is_url(source):
        return source
    if flavour is None:
        return Path(source).expanduser().resolve().as_uri()
    path = flavour(source)
    if not path.is_absolute():
        raise ValueError(f"{source!r} is not an absolute {flavour.__name__}")
    return path.as_uri()


def local_path(source: str) -> Path | None:
    """The file a plain path or `file://` URL names; None for an http(s) URL."""
    parsed = urlparse(source)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    return None if is_url(source) else Path(source).expanduser()


def join_url(base: str, name: str) -> str:
    return to_url(base).rstrip("/") + "/" + name


def _fetch_once(url: str, tmp: Path, timeout: float, desc: str) -> tuple[str, int]:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    digest, size = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            if expected is not None:
                ensure_space(tmp.parent, expected, f"downloading {url}")
            with open(tmp, "wb") as out, tqdm(
                total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                desc=desc, disable=None, leave=False,
            ) as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code in (408, 429):
            raise _Retryable(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if urlparse(url).scheme == "file":  # a local file does not come back on retry
            raise DownloadError(f"{url}: {e.reason}") from None
        raise _Retryable(f"URLError: {e.reason}") from None
    except (http.client.HTTPException, TimeoutError,
            ConnectionError) as e:
        raise _Retryable(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
    if expected is not None and size != expected:
        raise _Retryable(f"connection closed after {size} of {expected} bytes")
    return digest.hexdigest(), size


def download(
    sources: Sequence[str],
    dest: str | Path,
    *,
    sha256: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 1.0,
) -> Downloaded:
    """Fetch the first source that works into `dest`.

    Each source is tried up to `1 + retries` times, waiting `backoff * 2**k` seconds
    between tries, for network errors and HTTP 5xx; a 4xx or a checksum mismatch moves
    on to the next source. `dest` appears only once complete and verified.
    """
    if not sources:
        raise DownloadError(f"{dest}: no source to download from")
    dest = Path(dest)
    failures: list[str] = []
    for source in sources:
        url = to_url(source)
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                with atomic_path(dest) as tmp:
                    digest, size = _fetch_once(url, tmp, timeout, dest.name)
                    if sha256 is not None and digest != sha256.lower():
                        raise DownloadError(f"{url}: sha256 {digest} does not match the "
                                            f"expected {sha256.lower()}")
                return Downloaded(url=url, sha256=digest, bytes=size)
            except _Retryable as e:
                log.warning("%s: try %d of %d failed: %s", url, attempt + 1, retries + 1, e)
                failure = f"{url}: {e} (after {attempt + 1} tries)"
            except DownloadError as e:
                failure = str(e)
                break
        failures.append(failure)
        log.warning("%s", failure)
    raise DownloadError(f"could not download {dest.name}:\n  " + "\n  ".join(failures))


def file_digest(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def locate(
    sources: Sequence[str],
    dest: str | Path,
    *,
    sha256: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 1.0,
) -> Located:
    """As `download`, except that a local source (a plain path or a `file://` URL) is
    not copied: it is hashed where it is and read there (`Located.path`), so a large
    file is not stored twice. A local source that is missing or has another sha256 moves
    on to the next source, as an unanswered URL does."""
    if not sources:
        raise DownloadError(f"{dest}: no source to read from")
    failures: list[str] = []
    for source in sources:
        path = local_path(source)
        if path is None:
            try:
                got = download([source], dest, sha256=sha256, timeout=timeout,
                               retries=retries, backoff=backoff)
            except DownloadError as e:
                failures.append(str(e).removeprefix(f"could not download {Path(dest).name}:"
                                                    f"\n  "))
                continue
            return Located(got.url, got.sha256, got.bytes, str(dest), in_place=False)
        if not path.is_file():
            failures.append(f"{source}: not found" if not path.exists() else
                            f"{source}: not a file")
            continue
        digest, size = file_digest(path)
        if sha256 is not None and digest != sha256.lower():
            failures.append(f"{source}: sha256 {digest} does not match the expected "
                            f"{sha256.lower()}")
            continue
        return Located(source, digest, size, str(path), in_place=True)
    for failure in failures:
        log.warning("%s", failure)
    raise DownloadError(f"could not read {Path(dest).name} from any source:\n  "
                        + "\n  ".join(failures))
