"""Stage download_data: fetch the SMS Spam Collection zip and extract its messages; or,
for another `data.format`, find the labelled file (a local one is read in place)."""

from pathlib import Path

from spamlora import stage
from spamlora.config import Params
from spamlora.data import fetch_dataset, fetch_labelled
from spamlora.paths import Paths


def main(params: Params) -> None:
    paths, data = Paths(), params.data
    if data.format == "uci-sms":
        got = fetch_dataset(
            data.urls, paths.raw_dir, paths.raw_zip.name, paths.raw_messages.name,
            paths.raw_download_record.name, sha256=data.sha256,
            timeout=params.download.timeout, retries=params.download.retries)
        print(f"downloaded {got.bytes:,} bytes from {got.url} (sha256 {got.sha256})")
        return
    deps = {p.resolve() for p in paths.stage_deps("download_data", params.flat())}
    got = fetch_labelled(
        data.urls, paths.raw_dir, paths.raw_file(data.format).name,
        paths.raw_download_record.name, sha256=data.sha256,
        timeout=params.download.timeout, retries=params.download.retries,
        tracked=lambda path: Path(path).resolve() in deps)
    how = "reading in place" if got.in_place else "downloaded"
    print(f"{how} {got.path}: {got.bytes:,} bytes from {got.url} (sha256 {got.sha256})")


if __name__ == "__main__":
    stage.run(main)
