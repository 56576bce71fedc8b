"""Every source kind and row format, through the datasets library, with file:line origins."""

import csv
import json

import pytest
from datasets import Dataset, DatasetDict

from finetune.config import DataConfig, DataSource
from finetune.data import DataReport, load_conversations, prepare_data
from finetune.errors import FinetuneError

PAIRS = [(f"question {i}?", f"answer {i}.") for i in range(6)]


def _load(*sources, **data) -> tuple:
    report = DataReport()
    dataset = load_conversations(DataConfig(sources=list(sources), **data), report)
    return dataset, report


def _replies(dataset) -> list[str]:
    return [row["messages"][-1]["content"] if row["messages"] else row["text"] for row in dataset]


def test_jsonl_json_csv_parquet_and_txt(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"prompt": q, "completion": a}) for q, a in PAIRS))
    (tmp_path / "b.json").write_text(
        json.dumps([{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in PAIRS])
    )
    with open(tmp_path / "c.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["instruction", "input", "output"])
        for q, a in PAIRS:
            writer.writerow([q, "", a])
    Dataset.from_list(
        [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in PAIRS]
    ).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "e.txt").write_text("First paragraph\nstill first.\n\nSecond paragraph.\n\n\n\nThird.\n")
    for name, fmt in (
        ("a.jsonl", "prompt_completion"),
        ("b.json", "sharegpt"),
        ("c.csv", "alpaca"),
        ("d.parquet", "messages"),
    ):
        dataset, report = _load(DataSource(path=str(tmp_path / name)))
        assert _replies(dataset) == [a for _, a in PAIRS] and report.formats == {fmt: 6}, name
    text, report = _load(DataSource(path=str(tmp_path / "e.txt")))
    assert text["text"] == ["First paragraph\nstill first.", "Second paragraph.", "Third."]
    assert text["origin"] == [f"{tmp_path / 'e.txt'}:1", f"{tmp_path / 'e.txt'}:4", f"{tmp_path / 'e.txt'}:8"]
    lines, report = _load(DataSource(path=str(tmp_path / "e.txt"), text_unit="line"))
    assert lines["text"] == ["First paragraph", "still first.", "Second paragraph.", "Third."]
    assert lines["origin"][2:] == [f"{tmp_path / 'e.txt'}:4", f"{tmp_path / 'e.txt'}:8"]
    assert report.dropped["empty text row"] == 4  # blank lines are counted, not hidden


def test_csv_origins_are_real_line_numbers_even_with_multiline_cells(tmp_path):
    path = tmp_path / "multi.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "completion"])
        writer.writerow(["line one\nline two", "a"])
        writer.writerow(["q", ""])
    with pytest.raises(FinetuneError, match=rf"{path}:4: field `completion` must be a string"):
        _load(DataSource(path=str(path)), strict=True)


def test_messages_column_stored_as_json_text_in_csv(tmp_path):
    path = tmp_path / "m.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["messages"])
        writer.writerow([json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])])
    dataset, _ = _load(DataSource(path=str(path)))
    assert dataset[0]["messages"][1]["content"] == "hello"


def test_folder_glob_and_save_to_disk(tmp_path):
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    (folder / "one.jsonl").write_text(json.dumps({"prompt": "a?", "completion": "A."}) + "\n")
    (folder / "sub" / "two.jsonl").write_text(json.dumps({"prompt": "b?", "completion": "B."}) + "\n")
    (folder / "notes.md").write_text("ignored: not a data file type")
    dataset, _ = _load(DataSource(path=str(folder)))
    assert _replies(dataset) == ["A.", "B."] and dataset["origin"] == [
        f"{folder / 'one.jsonl'}:1",
        f"{folder / 'sub' / 'two.jsonl'}:1",
    ]
    globbed, _ = _load(DataSource(path=str(folder / "**" / "*.jsonl")))
    assert _replies(globbed) == ["A.", "B."]

    rows = [{"instruction": q, "output": a} for q, a in PAIRS]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": Dataset.from_list(rows[:2]), "extra": Dataset.from_list(rows[2:])}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    saved, _ = _load(DataSource(path=str(tmp_path / "saved")))
    assert len(saved) == 6
    extra, _ = _load(DataSource(path=str(tmp_path / "saved_dict"), split="extra"))
    assert _replies(extra) == [a for _, a in PAIRS[2:]]
    with pytest.raises(FinetuneError, match="has splits train, extra; set the source's `split`"):
        _load(DataSource(path=str(tmp_path / "saved_dict"), split="test"))


def test_missing_paths_and_unsupported_types_are_named(tmp_path):
    with pytest.raises(FinetuneError, match="nothing.jsonl` not found"):
        _load(DataSource(path=str(tmp_path / "nothing.jsonl")))
    (tmp_path / "data.xlsx").write_bytes(b"PK")
    with pytest.raises(
        FinetuneError, match=r"unsupported file type '.xlsx'; use one of .jsonl, .json, .csv, .parquet, .txt"
    ):
        _load(DataSource(path=str(tmp_path / "data.xlsx")))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FinetuneError, match="holds no .jsonl, .json, .csv, .parquet, .txt files"):
        _load(DataSource(path=str(tmp_path / "empty_dir")))


def test_hub_source_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FinetuneError, match="Hub dataset `someone/chats` could not be loaded.*save_to_disk"):
        _load(DataSource(type="hub", path="someone/chats"))


def test_column_and_role_mapping(tmp_path):
    path = tmp_path / "odd.jsonl"
    rows = [{"dialog": [{"speaker": "human", "text": q}, {"speaker": "bot", "text": a}]} for q, a in PAIRS]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    source = DataSource(
        path=str(path),
        format="messages",
        columns={"messages": "dialog", "role": "speaker", "content": "text"},
        roles={"human": "user", "bot": "assistant"},
    )
    dataset, _ = _load(source)
    assert [m["role"] for m in dataset[0]["messages"]] == ["user", "assistant"] and _replies(dataset) == [
        a for _, a in PAIRS
    ]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in PAIRS))
    dataset, report = _load(DataSource(path=str(qa), columns={"prompt": "question", "completion": "answer"}))
    assert report.formats == {"prompt_completion": 6}
    with pytest.raises(ValueError, match="columns: unknown field"):
        DataSource(path="x.jsonl", columns={"question": "q"})


def test_weights_mix_sources_in_the_training_split_only(tmp_path, chatml_tokenizer):
    many, few = tmp_path / "many.jsonl", tmp_path / "few.jsonl"
    many.write_text("\n".join(json.dumps({"prompt": f"m{i}?", "completion": f"M{i}."}) for i in range(40)))
    few.write_text("\n".join(json.dumps({"prompt": f"f{i}?", "completion": f"F{i}."}) for i in range(10)))
    cfg = DataConfig(
        sources=[DataSource(path=str(many), weight=0.5), DataSource(path=str(few), weight=3)],
        validation_split=0.1,
        test_split=0.1,
        max_length=64,
    )
    plain = prepare_data(
        cfg.model_copy(update={"sources": [DataSource(path=str(many)), DataSource(path=str(few))]}), chatml_tokenizer
    )
    mixed = prepare_data(cfg, chatml_tokenizer)

    def count(split, prefix):
        return sum(row["messages"][-1]["content"].startswith(prefix) for row in split)

    train_m, train_f = count(plain.splits["train"], "M"), count(plain.splits["train"], "F")
    assert (
        count(mixed.splits["train"], "M") == round(train_m * 0.5) and count(mixed.splits["train"], "F") == 3 * train_f
    )
    for name in ("validation", "test"):
        assert mixed.splits[name]["origin"] == plain.splits[name]["origin"]
    assert mixed.report.weighted == {str(many): round(train_m * 0.5), str(few): 3 * train_f}


def test_raw_text_rows_train_every_token_and_long_ones_are_chunked(tmp_path, chatml_tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(" ".join(f"word{i}_{j}" for j in range(60 if i == 0 else 5)) for i in range(12)))
    prepared = prepare_data(
        DataConfig(sources=[DataSource(path=str(path))], max_length=64, validation_split=0.1, test_split=0.1),
        chatml_tokenizer,
    )
    rows = [row for split in prepared.splits.values() for row in split]
    assert all(row["labels"] == row["input_ids"] and len(row["input_ids"]) <= 64 for row in rows)
    assert prepared.report.text_chunks_added >= 1 and prepared.report.trained_token_share == 1.0
    chunks = [row for row in rows if "(chunk" in row["origin"]]
    assert chunks and all(
        row["input_ids"][-1] == chatml_tokenizer.eos_token_id for row in rows if "(chunk" not in row["origin"]
    )
