"""Stage balance: parse every message strictly, then undersample ham to the spam count."""

from spamlora import stage
from spamlora.config import Params
from spamlora.data import balance, class_counts, parse_messages, write_csv
from spamlora.fileio import write_json
from spamlora.paths import Paths


def main(params: Params) -> None:
    paths = Paths()
    messages, report = parse_messages(paths.raw_messages, params.data.on_bad_line)
    balanced = balance(messages, params.data.seed)
    write_csv(balanced, paths.balanced)
    write_json(paths.metrics("balance"), {
        **report.as_dict(), "parsed": class_counts(messages),
        "balanced": class_counts(balanced)})
    print(f"{report.lines:,} lines, {len(report.skipped)} skipped -> {len(messages):,} "
          f"messages -> {len(balanced):,} balanced")


if __name__ == "__main__":
    stage.run(main)
