"""Stage split: shuffle the balanced set and cut it into train / validation / test."""

from spamlora import stage
from spamlora.config import Params
from spamlora.data import read_labelled_csv, split, split_counts, write_csv
from spamlora.fileio import write_json
from spamlora.paths import Paths


def main(params: Params) -> None:
    paths = Paths()
    parts = split(read_labelled_csv(paths.balanced), params.data.train_frac, params.data.val_frac,
                  params.data.seed)
    for name, part in parts.items():
        write_csv(part, paths.split(name))
    counts = split_counts(parts)
    write_json(paths.metrics("data"), counts)
    print(" / ".join(f"{name} {c['rows']:,}" for name, c in counts.items()))
    for name in ("validation", "test"):
        if counts[name]["in_train"]:
            print(f"note: {counts[name]['in_train']} {name} messages have a copy in train "
                  f"(data.dedupe: true removes duplicate texts)")


if __name__ == "__main__":
    stage.run(main)
