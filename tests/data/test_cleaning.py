"""Each cleaning step on its own, and the report's per-step counts."""

import json

import pytest

from finetune.config import CleaningConfig, DataConfig, DataSource
from finetune.data import DataReport, load_conversations
from finetune.data.cleaning import normalize_unicode, normalize_whitespace, remove_control_chars, scrub_pii, strip_html
from finetune.errors import FinetuneError


def test_strip_html_keeps_text_and_line_breaks():
    assert strip_html("<p>Hello&nbsp;<b>world</b> &amp; friends</p><p>Bye</p>") == "\nHello\xa0world & friends\nBye"
    assert strip_html("x < y and y > z") == "x < y and y > z"  # comparisons are not tags
    assert strip_html("no markup") == "no markup"


def test_unicode_is_nfc_not_nfkc():
    decomposed = "cafe\u0301"  # e + combining acute
    assert normalize_unicode(decomposed) == "café"
    assert normalize_unicode("x² ﬁ") == "x² ﬁ"  # NFKC would turn these into "x2 fi"


def test_control_and_invisible_characters_go_but_newlines_and_tabs_stay():
    assert remove_control_chars("a\x00b\x07c\u200bd\ufeffe\r\nf\tg\u00adh") == "abcde\nf\tgh"
    assert remove_control_chars("👩\u200d💻") == "👩\u200d💻"  # the zero-width joiner builds the emoji


def test_whitespace_keeps_indentation():
    code = "  def f():   \n      return 1\n\n\n\n\nprint(f())  "
    assert normalize_whitespace(code) == "def f():\n      return 1\n\nprint(f())"
    assert normalize_whitespace("a\u00a0b") == "a b"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Mail jane.doe+x@example.co.uk today", "Mail [EMAIL] today"),
        ("Call +44 20 7946 0958 now", "Call [PHONE] now"),
        ("Call (555) 123-4567.", "Call [PHONE]."),
        ("Order 1234567890123 shipped", "Order 1234567890123 shipped"),  # a bare long integer is not a phone number
        ("On 2024-01-15 at 10:30", "On 2024-01-15 at 10:30"),
        ("Host 192.168.100.200 is up", "Host 192.168.100.200 is up"),
        ("Pi is 3.14159265358979", "Pi is 3.14159265358979"),
    ],
)
def test_pii_scrubbing(text, expected):
    assert scrub_pii(text) == expected


def _rows(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in rows))
    return path


def test_report_counts_each_step_and_drops(tmp_path):
    path = _rows(
        tmp_path,
        [
            ("<b>Hi</b>", "Hello  "),  # html + whitespace
            ("Email me: a@b.com", "OK"),  # pii
            ("Tell me about darn things", "No"),  # blocklist
            ("CAPS", "YES"),  # lowercase
            ("caps", "yes"),  # becomes an exact duplicate after lowercasing
            ("ctrl\x07", "x"),  # control char
        ],
    )
    clean = CleaningConfig(html=True, lowercase=True, pii=True, blocklist=["DARN"])
    report = DataReport()
    dataset = load_conversations(DataConfig(sources=[DataSource(path=str(path))], clean=clean), report)
    assert report.cleaned == {"html": 1, "whitespace": 1, "pii": 1, "lowercase": 4, "control_chars": 1}
    assert report.dropped == {"contains a data.clean.blocklist term": 1, "exact duplicate": 1}
    assert dataset[0]["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert dataset[1]["messages"][0]["content"] == "email me: [EMAIL]"
    assert any("changed by cleaning step `pii`" in line for line in report.lines())


def test_cleaning_that_empties_a_message_makes_the_row_invalid_and_counted(tmp_path):
    path = _rows(tmp_path, [("<br>", "answer")] + [(f"q{i}", "a") for i in range(30)])
    report = DataReport()
    load_conversations(DataConfig(sources=[DataSource(path=str(path))], clean=CleaningConfig(html=True)), report)
    assert report.invalid == {"empty content": 1}


def test_blocklist_file_and_word_boundaries(tmp_path):
    blocklist = tmp_path / "block.txt"
    blocklist.write_text("# one term per line\nass\n")
    path = _rows(tmp_path, [("a class act", "yes"), ("you ass", "no")])
    report = DataReport()
    dataset = load_conversations(
        DataConfig(sources=[DataSource(path=str(path))], clean=CleaningConfig(blocklist=str(blocklist))), report
    )
    assert len(dataset) == 1 and dataset[0]["messages"][0]["content"] == "a class act"
    with pytest.raises(FinetuneError, match="data.clean.blocklist: file `nope.txt` not found"):
        load_conversations(
            DataConfig(sources=[DataSource(path=str(path))], clean=CleaningConfig(blocklist="nope.txt")), DataReport()
        )


def test_near_duplicates_are_dropped_and_named(tmp_path):
    base = (
        "The quick brown fox jumps over the lazy dog near the quiet river bank every single morning, "
        "while seven sleepy owls watch from an old oak tree and count the ripples until the sun finally rises"
    )
    path = _rows(
        tmp_path,
        [
            (base, "It is a pangram."),
            (base + " again", "It is a pangram."),  # near copy
            ("What is the boiling point of water at sea level in degrees Celsius?", "One hundred degrees."),
        ],
    )
    report = DataReport()
    dataset = load_conversations(
        DataConfig(sources=[DataSource(path=str(path))], clean=CleaningConfig(near_duplicates=0.8)), report
    )
    assert len(dataset) == 2 and report.dropped["near duplicate (similarity >= 0.8)"] == 1
    assert f"{path}:2 ~ {path}:1" in " ".join(report.invalid_examples)
    off = load_conversations(DataConfig(sources=[DataSource(path=str(path))]), DataReport())
    assert len(off) == 3
