"""Stage balance: parse every message strictly, then undersample every class to the
smallest one's count (`data.balance: none` keeps them all)."""

from spamlora import stage
from spamlora.config import Params
from spamlora.data import (
    balance,
    class_counts,
    dedupe,
    label_conflicts,
    read_messages,
    source_file,
    write_csv,
)
from spamlora.fileio import write_json
from spamlora.paths import Paths


def main(params: Params) -> None:
    paths, data = Paths(), params.data
    source = (paths.raw_messages if data.format == "uci-sms"
              else source_file(paths.raw_download_record))
    messages, classes, report = read_messages(
        source, data.format, data.text_column, data.label_column, data.on_bad_line,
        data.classes, data.positive)
    distinct = dedupe(messages) if data.dedupe else messages
    balanced = balance(distinct, data.seed, data.balance)
    conflicts = label_conflicts(messages, classes)
    classes.write(paths.classes)
    write_csv(balanced, paths.balanced)
    write_json(paths.metrics("balance"), {
        **report.as_dict(), "parsed": class_counts(messages, classes),
        "duplicates_removed": len(messages) - len(distinct),
        "label_conflicts": conflicts,
        "balanced": class_counts(balanced, classes)})
    print(f"{report.lines:,} lines, {len(report.skipped)} skipped -> {len(messages):,} "
          f"messages" + (f" -> {len(distinct):,} distinct" if data.dedupe else "")
          + f" -> {len(balanced):,} " + ("balanced" if data.balance != "none" else "kept")
          + f"; classes {list(classes.names)}")
    if conflicts["texts"]:
        print(f"note: {conflicts['texts']} texts ({conflicts['messages']} messages) carry "
              f"two or more labels (metrics/balance.json lists some)")


if __name__ == "__main__":
    stage.run(main)
