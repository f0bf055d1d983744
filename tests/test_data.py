"""Parsing, balancing and splitting the SMS Spam Collection."""

import pandas as pd
import pytest

from spamlora.data import (
    DataError,
    balance,
    class_counts,
    dedupe,
    parse_messages,
    read_labelled_csv,
    seen_in,
    split,
    split_counts,
    write_csv,
)

from .conftest import sms_lines


def write(tmp_path, data: bytes):
    path = tmp_path / "SMSSpamCollection"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("line, reason", [
    (b"ham no tab here", "exactly one tab"),
    (b"ham\tone\ttab too many", "exactly one tab"),
    (b"eggs\tunknown label", "unknown label 'eggs'"),
    (b"spam\t   ", "empty message text"),
    (b"ham\t\xff\xfe broken", "invalid UTF-8"),
])
def test_bad_line_names_file_and_line(tmp_path, line, reason):
    path = write(tmp_path, b"ham\tfine\nspam\talso fine\n" + line + b"\nham\tlast\n")
    with pytest.raises(DataError, match=rf"SMSSpamCollection, line 3: .*{reason}"):
        parse_messages(path)
    df, report = parse_messages(path, on_bad_line="skip")
    assert df["id"].tolist() == [1, 2, 4]
    assert report.as_dict()["skipped"] == 1
    assert report.skipped[0]["line"] == 3 and reason in report.skipped[0]["reason"]


def test_stray_quotes_do_not_merge_lines(tmp_path):
    path = write(tmp_path, b'ham\t"Hello there\nspam\tFREE "prize" now\nham\tbye"\n')
    df, _ = parse_messages(path)
    assert df["text"].tolist() == ['"Hello there', 'FREE "prize" now', 'bye"']
    assert df["label"].tolist() == [0, 1, 0]


def test_crlf_line_endings_and_missing_final_newline(tmp_path):
    df, report = parse_messages(write(tmp_path, b"ham\thi\r\nspam\twin\r\nham\tlast"))
    assert df["text"].tolist() == ["hi", "win", "last"] and report.lines == 3


def test_csv_round_trip_keeps_quotes_commas_and_empty_looking_text(tmp_path):
    df = pd.DataFrame({"id": [1, 2, 3], "text": ['say "hi", ok', "NA", "null"],
                       "label": [0, 1, 0]})
    write_csv(df, tmp_path / "x.csv")
    back = read_labelled_csv(tmp_path / "x.csv")
    assert back["text"].tolist() == df["text"].tolist()
    assert back["label"].tolist() == [0, 1, 0]


def test_read_labelled_csv_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_labelled_csv(tmp_path / "none.csv")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="expected columns"):
        read_labelled_csv(tmp_path / "bad.csv")


def test_balance_and_split_on_a_stand_in(tmp_path):
    df, _ = parse_messages(write(tmp_path, sms_lines(30, 20).encode()))
    balanced = balance(df, seed=1)
    assert class_counts(balanced) == {"rows": 40, "ham": 20, "spam": 20}
    parts = split(balanced, 0.5, 0.25, seed=1)
    assert [len(p) for p in parts.values()] == [20, 10, 10]
    ids = pd.concat(parts.values())["id"]
    assert ids.is_unique and set(ids) == set(balanced["id"])
    with pytest.raises(DataError, match="would be empty"):
        split(balanced.head(3), 0.5, 0.25, seed=1)


def test_real_file_counts_and_reproducible_split(sms_file):
    df, report = parse_messages(sms_file)
    assert report.lines == 5574 and not report.skipped
    assert class_counts(df) == {"rows": 5574, "ham": 4827, "spam": 747}
    balanced = balance(df, seed=123)
    assert class_counts(balanced) == {"rows": 1494, "ham": 747, "spam": 747}
    parts = split(balanced, 0.7, 0.1, seed=123)
    assert [len(p) for p in parts.values()] == [1045, 149, 300]
    again = split(balance(parse_messages(sms_file)[0], seed=123), 0.7, 0.1, seed=123)
    for name in parts:
        pd.testing.assert_frame_equal(parts[name], again[name])
    other = split(balance(df, seed=7), 0.7, 0.1, seed=7)
    assert not parts["test"]["id"].equals(other["test"]["id"])


def test_copies_across_splits_are_counted_and_dedupe_removes_them(tmp_path):
    lines = sms_lines(30, 20) + "spam\tWINNER! claim your FREE prize 3 now,  txt CLAIM to 80003\n" \
        "ham\t  hey are we still meeting at 1 pm, see you soon\n"
    df, _ = parse_messages(write(tmp_path, lines.encode()))
    assert len(df) == 52 and len(dedupe(df)) == 50  # white space differs only
    train = df.head(30)
    part = df.tail(22)
    assert seen_in(part, train).tolist() == [False] * 20 + [False, True]  # ham 1 in train
    parts = {"train": df.head(40), "validation": df.iloc[40:46], "test": df.iloc[46:]}
    counts = split_counts(parts)
    assert counts["test"]["in_train"] == 2 and counts["test"]["spam_in_train"] == 1
    assert counts["validation"]["in_train"] == 0 and "in_train" not in counts["train"]
    strict = split(balance(dedupe(df), seed=1), 0.5, 0.25, seed=1)
    for name, other in (("validation", "train"), ("test", "train"), ("test", "validation")):
        assert not seen_in(strict[name], strict[other]).any()


def test_real_split_overlap_and_the_strict_split(sms_file):
    df, _ = parse_messages(sms_file)
    counts = split_counts(split(balance(df, seed=123), 0.7, 0.1, seed=123))
    # Exact copies: 36 test messages (33 spam); after white-space folding 39 (36 spam).
    assert (counts["test"]["in_train"], counts["test"]["spam_in_train"]) == (39, 36)
    assert (counts["validation"]["in_train"], counts["validation"]["spam_in_train"]) == \
        (14, 11)
    distinct = dedupe(df)
    assert class_counts(distinct) == {"rows": 5160, "ham": 4518, "spam": 642}
    strict = split(balance(distinct, seed=123), 0.7, 0.1, seed=123)
    assert [len(p) for p in strict.values()] == [898, 128, 258]
    strict_counts = split_counts(strict)
    assert strict_counts["test"]["in_train"] == strict_counts["validation"]["in_train"] == 0
