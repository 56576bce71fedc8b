"""Messy files and rows, tried systematically: each ends in one clear FinetuneError naming the file (and line), or
loads correctly; never an unhandled exception, and never at the cost of an earlier run's outputs."""

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune import ChatSFTRecipe
from finetune.config import DataConfig, DataSource
from finetune.data import DataReport, load_conversations
from finetune.errors import FinetuneError
from tests.conftest import tiny_recipe

ROW = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
GOOD_LINE = json.dumps(ROW)


def _variant(i: int) -> str:
    return json.dumps({"prompt": f"question {i}", "completion": f"answer {i}"})


def _load(path: Path, **data):
    return load_conversations(DataConfig(sources=[DataSource(path=str(path))], **data), DataReport())


@pytest.mark.parametrize(
    ("name", "content", "error"),
    [
        ("truncated.jsonl", (GOOD_LINE + "\n") * 3 + GOOD_LINE[:20], r"truncated.jsonl:4: invalid JSON"),
        (
            "latin1.jsonl",
            (GOOD_LINE + "\n" + '{"prompt": "caf\u00e9", "completion": "x"}\n').encode("latin-1"),
            r"latin1.jsonl:2: not UTF-8 text",
        ),
        ("utf16.jsonl", (GOOD_LINE + "\n").encode("utf-16"), r"utf16.jsonl:1: not UTF-8 text"),
        ("empty.jsonl", b"", r"empty.jsonl: the file is empty"),
        ("garbage.jsonl", bytes(range(256)) * 4, r"garbage.jsonl: binary data, not a text file"),
        ("cut.json", "[" + GOOD_LINE + ",\n" + GOOD_LINE[:15], r"cut.json:2: invalid JSON"),
        ("garbage.parquet", b"PAR1 this is not parquet", r"garbage.parquet: could not be read as parquet"),
        ("ragged.csv", "prompt,completion\na,b\nc,d,e,f\n", r"ragged.csv: could not be read as csv"),
        ("numbers.jsonl", "1\n2\n3\n", r"3 of 3 rows are invalid.*numbers.jsonl:1: a row must be an object"),
        ("blank.jsonl", "\n\n   \n", r"blank.jsonl"),
    ],
)
def test_malformed_files_get_one_clear_error(tmp_path, name, content, error):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(FinetuneError, match=f"(?s){error}"):
        _load(path)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("bom.jsonl", "\ufeff" + "\n".join(_variant(i) for i in range(3))),
        ("crlf.jsonl", "\r\n".join(_variant(i) for i in range(3)) + "\r\n"),
        ("blank_lines.jsonl", "\n\n" + "\n\n".join(_variant(i) for i in range(3))),
    ],
)
def test_harmless_quirks_load_with_right_line_numbers(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8"))
    dataset = _load(path)
    assert [row["messages"][1]["content"] for row in dataset] == ["answer 0", "answer 1", "answer 2"]
    expected = {"bom.jsonl": [1, 2, 3], "crlf.jsonl": [1, 2, 3], "blank_lines.jsonl": [3, 5, 7]}[name]
    assert dataset["origin"] == [f"{path}:{n}" for n in expected]


def test_a_huge_line_loads(tmp_path):
    path = tmp_path / "huge.jsonl"
    huge = {"prompt": "summarise: " + "word " * 600_000, "completion": "words."}
    path.write_text(json.dumps(huge) + "\n" + _variant(1) + "\n")
    assert len(_load(path)) == 2


def test_bad_data_never_costs_the_previous_run(tiny_llama_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"from": "the previous good run"}')
    broken = tmp_path / "broken.jsonl"
    broken.write_text(GOOD_LINE + "\n{not json\n")
    recipe = ChatSFTRecipe(**tiny_recipe(tiny_llama_dir, broken, run_dir, output__overwrite=True))
    with pytest.raises(FinetuneError, match=r"broken.jsonl:2: invalid JSON"):
        recipe.setup()
    assert (run_dir / "metrics.json").read_text() == '{"from": "the previous good run"}'


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["role", "content", "from", "value", "x"]), children, max_size=3)
    ),
    max_leaves=8,
)
_ROWS = st.dictionaries(
    st.sampled_from(
        [
            "messages",
            "conversations",
            "instruction",
            "input",
            "output",
            "prompt",
            "completion",
            "text",
            "system",
            "other",
        ]
    ),
    _JSON,
    max_size=4,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(_ROWS | _JSON, min_size=1, max_size=6), strict=st.booleans())
def test_any_rows_end_in_data_or_a_finetune_error_naming_the_line(rows, strict):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random.jsonl"
        path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
        try:
            dataset = _load(path, strict=strict, max_bad_fraction=1.0)
        except FinetuneError as exc:
            # Either a row was named by its line, or the file as a whole was refused by name.
            assert str(path) in str(exc) or "no valid conversations" in str(exc), str(exc)
        else:
            assert all(row["messages"] or row["text"] for row in dataset)
