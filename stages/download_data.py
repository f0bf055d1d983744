"""Stage download_data: fetch the SMS Spam Collection zip and extract its messages."""

from spamlora import stage
from spamlora.config import Params
from spamlora.data import fetch_dataset
from spamlora.paths import Paths


def main(params: Params) -> None:
    paths = Paths()
    got = fetch_dataset(
        params.data.urls, paths.raw_dir, paths.raw_zip.name, paths.raw_messages.name,
        paths.raw_download_record.name, sha256=params.data.sha256,
        timeout=params.download.timeout, retries=params.download.retries)
    print(f"downloaded {got.bytes:,} bytes from {got.url} (sha256 {got.sha256})")


if __name__ == "__main__":
    stage.run(main)
