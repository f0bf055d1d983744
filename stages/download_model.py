"""Stage download_model: fetch the GPT-2 weights, config and tokenizer files."""

from spamlora import stage
from spamlora.config import Params
from spamlora.paths import Paths
from spamlora.weights import fetch_model


def main(params: Params) -> None:
    model = params.model
    expected = model.expected_sha256
    if expected is None:
        why = ("model.sha256 is null" if model.sha256 is None else
               f"no checksums are pinned for {model.name} (see docs/downloads.md: pinned "
               f"base weights)")
        print(f"warning: the files are not checked: {why}; their sha256 is recorded in "
              f"{Paths().base_model / 'download.json'}")
    record = fetch_model(model.name, model.base_url, Paths().base_model,
                         params.download.timeout, params.download.retries,
                         model.resolved_revision, expected)
    for name, got in record.items():
        check = "verified" if got["verified"] else "unchecked"
        print(f"{name}: {got['bytes']:,} bytes, sha256 {got['sha256']} ({check}), "
              f"from {got['source']}")


if __name__ == "__main__":
    stage.run(main)
