"""Stage download_model: fetch the GPT-2 weights, config and tokenizer files."""

from spamlora import stage
from spamlora.config import Params
from spamlora.paths import Paths
from spamlora.weights import fetch_model


def main(params: Params) -> None:
    record = fetch_model(params.model.base_url, Paths().base_model,
                         params.download.timeout, params.download.retries)
    for name, got in record.items():
        print(f"{name}: {got['bytes']:,} bytes, sha256 {got['sha256']}")


if __name__ == "__main__":
    stage.run(main)
