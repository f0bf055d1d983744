"""Stage split: shuffle the balanced set and cut it into train / validation / test."""

from spamlora import stage
from spamlora.config import Params
from spamlora.data import (
    Classes,
    check_split,
    label_conflicts,
    read_labelled_csv,
    split,
    split_counts,
    write_csv,
)
from spamlora.fileio import write_json
from spamlora.paths import SPLITS, Paths


def main(params: Params) -> None:
    paths, data = Paths(), params.data
    classes = Classes.read(paths.classes)
    balanced = read_labelled_csv(paths.balanced)
    parts = split(balanced, data.train_frac, data.val_frac, data.seed, data.stratify)
    check_split(parts, classes, paths.balanced, data.stratify)
    for name, part in parts.items():
        write_csv(part, paths.split(name))
    counts = split_counts(parts, classes)
    conflicts = label_conflicts(balanced, classes)
    # Reported where there are any: the default data has none, and its data.json stays
    # what it always was.
    write_json(paths.metrics("data"),
               {**counts, **({"label_conflicts": conflicts} if conflicts["texts"] else {})})
    print(" / ".join(f"{name} {counts[name]['rows']:,}" for name in SPLITS))
    for name in ("validation", "test"):
        if counts[name]["in_train"]:
            print(f"note: {counts[name]['in_train']} {name} messages have a copy in train "
                  f"(data.dedupe: true removes duplicate texts)")
    if conflicts["texts"]:
        print(f"note: {conflicts['texts']} texts ({conflicts['messages']} messages) are in "
              f"the splits with two or more labels (examples in metrics/data.json)")


if __name__ == "__main__":
    stage.run(main)
