"""Stage balance: parse every message strictly, then undersample ham to the spam count."""

from spamlora import stage
from spamlora.config import Params
from spamlora.data import balance, class_counts, dedupe, parse_messages, write_csv
from spamlora.fileio import write_json
from spamlora.paths import Paths


def main(params: Params) -> None:
    paths = Paths()
    messages, report = parse_messages(paths.raw_messages, params.data.on_bad_line)
    distinct = dedupe(messages) if params.data.dedupe else messages
    balanced = balance(distinct, params.data.seed)
    write_csv(balanced, paths.balanced)
    write_json(paths.metrics("balance"), {
        **report.as_dict(), "parsed": class_counts(messages),
        "duplicates_removed": len(messages) - len(distinct),
        "balanced": class_counts(balanced)})
    print(f"{report.lines:,} lines, {len(report.skipped)} skipped -> {len(messages):,} "
          f"messages" + (f" -> {len(distinct):,} distinct" if params.data.dedupe else "")
          + f" -> {len(balanced):,} balanced")


if __name__ == "__main__":
    stage.run(main)
