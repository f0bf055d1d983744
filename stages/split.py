"""Stage split: shuffle the balanced set and cut it into train / validation / test."""

from spamlora import stage
from spamlora.config import Params
from spamlora.data import class_counts, read_labelled_csv, split, write_csv
from spamlora.fileio import write_json
from spamlora.paths import Paths


def main(params: Params) -> None:
    paths = Paths()
    parts = split(read_labelled_csv(paths.balanced), params.data.train_frac, params.data.val_frac,
                  params.data.seed)
    for name, part in parts.items():
        write_csv(part, paths.split(name))
    counts = {name: class_counts(part) for name, part in parts.items()}
    write_json(paths.metrics("data"), counts)
    print(" / ".join(f"{name} {c['rows']:,}" for name, c in counts.items()))


if __name__ == "__main__":
    stage.run(main)
