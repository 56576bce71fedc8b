"""Preference data: pairs of replies (chosen over rejected) and unpaired replies labelled good or bad (KTO).

Entry point: `prepare_preferences(cfg, tokenizer, paired=...)` -> PreparedData. Each split's rows hold:
- `prompt` (messages), `chosen` and `rejected` (reply texts) or `completion` and `label` (KTO), `tools`, `origin`;
- `messages`: the prompt with the chosen reply (KTO: the completion), and `input_ids` / `labels` exactly as SFT
  tokenizes that conversation: perplexity, the merge check and export read this view;
- `prompt_ids` with `chosen_ids` and `rejected_ids` (KTO: `completion_ids` and `label`): what TRL's trainers take.

Formats (TRL's), detected per row as the SFT formats are:
- `preference`: `prompt` + `chosen` + `rejected`. The prompt is a string (one user turn) or messages; a reply is a
  string or messages holding one assistant turn.
- `preference_implicit`: `chosen` + `rejected`, two whole conversations that differ only in the last assistant turn
  (Anthropic HH style); as messages, or as text with "Human:" / "Assistant:" markers.
- `unpaired`: `prompt` + `completion` + `label` (true: a good reply, false: a bad one), for KTO.
- any supervised source with `rejected: shuffled`: pairs built from its conversations (its last reply chosen over
  another conversation's last reply).

Tokens come from the SFT masks (`finetune.data.masks`): a pair is two conversations, prompt + chosen and prompt +
rejected, and each reply is exactly its trained span: the tokens after the very prompt inference feeds the model,
through the template's end-of-turn token. So no EOS is appended after the end of turn (TRL #4481), no BOS sits before
a reply (axolotl #1616), and a template that rewrites earlier turns once a reply follows (TRL #6361) still gets the
prompt inference uses. Pairs whose prompt alone fills data.max_length are dropped (TRL #6321); the audit counts each
pitfall it saw.
"""

from __future__ import annotations

import random
import re
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets
from transformers import PreTrainedTokenizerBase

from finetune.config import DataConfig, DataSource
from finetune.data.audit import audit, enforce
from finetune.data.cleaning import clean_conversation, load_blocklist, text_steps
from finetune.data.formats import _rename, to_conversation, to_messages, validate_messages
from finetune.data.masks import IGNORE_INDEX, conversation_samples, end_of_turn_ids
from finetune.data.report import DataReport, Finding, PreparedData, RowError
from finetune.data.sources import read_source
from finetune.errors import FinetuneError

PREFERENCE_FORMATS = ("preference", "preference_implicit", "unpaired")
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def detect_preference_format(row: dict[str, Any]) -> str:
    """The preference format of a raw row: "preference" (prompt, chosen, rejected), "preference_implicit" (chosen
    and rejected as whole conversations) or "unpaired" (prompt, completion, label; KTO).

    Args:
        row: A raw row with its columns already renamed.

    Returns:
        The format's name.

    Raises:
        RowError: The row has none of these sets of fields.
    """
    present = {k for k, v in row.items() if v is not None}
    if {"chosen", "rejected"} <= present:
        return "preference" if "prompt" in present else "preference_implicit"
    if {"prompt", "completion", "label"} <= present:
        return "unpaired"
    raise RowError(
        f"not preference data (fields: {', '.join(sorted(present)) or 'none'}); expected `prompt`+`chosen`+`rejected`, "
        "`chosen`+`rejected` (two whole conversations), or `prompt`+`completion`+`label` for KTO (map other field "
        "names with the source's `columns`)"
    )


def to_preference(row: Any, source: DataSource) -> tuple[str, dict[str, Any]]:
    """(format, normalized row) of one raw row: `prompt` messages with `chosen` + `rejected` texts, or with
    `completion` + `label`.

    Args:
        row: A raw row as a source yields it.
        source: Its `data.sources` entry: format, columns, roles.

    Returns:
        (format, row with `prompt` messages and `chosen`/`rejected` or `completion`/`label`).

    Raises:
        RowError: The row is not an object, the source's format is a supervised one, or a field is invalid.
    """
    if not isinstance(row, dict):
        raise RowError("a row must be an object with named fields")
    if source.columns:
        row = _rename(row, source.columns)
    if source.format not in ("auto", *PREFERENCE_FORMATS):
        raise RowError(
            f"the source's format `{source.format}` is a supervised format; a preference method reads "
            f"{', '.join(PREFERENCE_FORMATS)} (or auto)"
        )
    fmt = detect_preference_format(row) if source.format == "auto" else source.format
    if fmt == "preference_implicit":
        prompt, chosen, rejected = _implicit(row["chosen"], row["rejected"], source)
        return fmt, {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    prompt = _prompt(row["prompt"], source)
    if fmt == "unpaired":
        if not isinstance(row["label"], bool):
            raise RowError(f"field `label` must be true or false, got {row['label']!r}")
        return fmt, {
            "prompt": prompt,
            "completion": _reply(row["completion"], "completion", source),
            "label": row["label"],
        }
    return fmt, {
        "prompt": prompt,
        "chosen": _reply(row["chosen"], "chosen", source),
        "rejected": _reply(row["rejected"], "rejected", source),
    }


def _prompt(value: Any, source: DataSource) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise RowError("field `prompt` must be a string or a non-empty list of messages")
    messages = to_messages({"messages": value}, "messages", source.roles)
    if messages[-1]["role"] != "user":
        raise RowError("field `prompt` must end with a user turn (the one the replies answer)")
    return messages


def _reply(value: Any, field: str, source: DataSource) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        messages = to_messages({"messages": value}, "messages", source.roles)
        if len(messages) == 1 and messages[0]["role"] == "assistant":
            return messages[0]["content"]
    raise RowError(f"field `{field}` must be a string or a list holding one assistant message")


def _conversation(value: Any, field: str, source: DataSource) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return _hh_turns(value, field)
    if isinstance(value, list) and value:
        return to_messages({"messages": value}, "messages", source.roles)
    raise RowError(f"field `{field}` must be a conversation: messages, or text with Human:/Assistant: turns")


def _hh_turns(text: str, field: str) -> list[dict[str, Any]]:
    """Anthropic HH's plain-text conversations: "\\n\\nHuman: ...\\n\\nAssistant: ..."."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise RowError(f"field `{field}` is text without Human:/Assistant: turns")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": said.strip()} for speaker, said in zip(parts[1::2], parts[2::2])]


def _implicit(chosen: Any, rejected: Any, source: DataSource) -> tuple[list[dict[str, Any]], str, str]:
    """Two whole conversations -> the turns they share (the prompt) and each one's final assistant reply."""
    chosen_turns, rejected_turns = _conversation(chosen, "chosen", source), _conversation(rejected, "rejected", source)
    shared = 0
    while shared < min(len(chosen_turns), len(rejected_turns)) and chosen_turns[shared] == rejected_turns[shared]:
        shared += 1
    prompt, chosen_rest, rejected_rest = chosen_turns[:shared], chosen_turns[shared:], rejected_turns[shared:]
    if (
        len(chosen_rest) != 1
        or len(rejected_rest) != 1
        or {chosen_rest[0]["role"], rejected_rest[0]["role"]} != {"assistant"}
    ):
        raise RowError(
            "`chosen` and `rejected` must be the same conversation up to one last assistant turn each "
            f"({len(prompt)} shared turns, then {len(chosen_rest)} and {len(rejected_rest)})"
        )
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError("the turns `chosen` and `rejected` share must end with a user turn")
    return prompt, chosen_rest[0]["content"], rejected_rest[0]["content"]


# ---------------------------------------------------------------------------------------------- loading


def load_preferences(
    cfg: DataConfig, report: DataReport, *, paired: bool, sources: list[DataSource] | None = None
) -> Dataset:
    """The sources as one Dataset of cleaned, validated, de-duplicated pairs (or unpaired KTO rows).

    Args:
        cfg: The `data:` section: sources, cleaning, strict, max_bad_fraction, seed.
        report: The data report, added to in place.
        paired: True for dpo, orpo and simpo (chosen + rejected rows), False for kto (labelled completions).
        sources: Sources to read instead of `cfg.sources` (the separate validation or test sources).

    Returns:
        The rows as one Dataset, with origin and source columns.

    Raises:
        FinetuneError: A row is invalid while `data.strict` is on, more than `data.max_bad_fraction` of the rows are
            invalid, or no valid row is left (`data.sources`).
    """
    steps = text_steps(cfg.clean)
    blocklist = load_blocklist(cfg.clean)
    kept, seen, bad, read_before = [], set(), 0, report.rows_read
    for source_index, source in enumerate(sources or cfg.sources):
        for origin, raw in _rows(source, cfg.seed):
            report.rows_read += 1
            try:
                fmt, row = raw if source.rejected else to_preference(raw, source)
                if paired != (fmt != "unpaired"):
                    raise RowError(
                        "an unpaired row (prompt + completion + label) in a paired method's data: dpo, orpo and simpo "
                        "need chosen + rejected; use method: kto for labelled replies"
                        if paired
                        else "a chosen/rejected pair in KTO data: KTO takes prompt + completion + label; use dpo, "
                        "orpo or simpo for pairs"
                    )
                report.formats[fmt] += 1
                row = _cleaned(row, cfg, steps, report)
                for conversation in _conversations(row):
                    validate_messages(conversation)
            except RowError as exc:
                if cfg.strict:
                    raise FinetuneError(
                        f"{origin}: {exc}. (data.strict is on; set it to false to skip bad rows.)"
                    ) from exc
                bad += 1
                report.invalid[str(exc)] += 1
                report.invalid_examples.append(f"{origin}: {exc}")
                continue
            if paired and row["chosen"].strip() == row["rejected"].strip():
                report.dropped["chosen and rejected are the same reply (nothing to prefer)"] += 1
                continue
            if blocklist is not None and any(blocklist.search(m["content"]) for c in _conversations(row) for m in c):
                report.dropped["contains a data.clean.blocklist term"] += 1
                continue
            key = repr(sorted(row.items()))
            if key in seen:
                report.dropped["exact duplicate"] += 1
                continue
            seen.add(key)
            kept.append({**row, "tools": "", "origin": origin, "source": source_index if sources is None else -1})
    read = report.rows_read - read_before
    if read and bad / read > cfg.max_bad_fraction:
        raise FinetuneError(
            f"{bad} of {read} rows are invalid (more than data.max_bad_fraction={cfg.max_bad_fraction}). "
            "First problems:\n  " + "\n  ".join(report.invalid_examples[-bad:][:5])
        )
    if not kept:
        raise FinetuneError(
            "data.sources: no valid preference rows found"
            + (f" ({bad} invalid rows; e.g. {report.invalid_examples[0]})" if bad else ".")
        )
    return Dataset.from_list(kept)


def _rows(source: DataSource, seed: int) -> Any:
    """(origin, raw row) of a preference source; for a supervised source with `rejected: shuffled`, (origin,
    (format, pair)) built from its conversations: each one's last reply is chosen, the last reply of another is
    rejected (a seeded derangement, so no conversation is paired with its own reply)."""
    if not source.rejected:
        yield from read_source(source)
        return
    conversations, seen = [], set()
    for origin, raw in read_source(source):
        try:
            _, messages, _, _ = to_conversation(raw, source)
        except RowError:
            continue  # an unusable conversation is simply not paired; the SFT path reports such rows
        key = repr(messages)  # a repeated conversation would otherwise come back as a pair with another rejection
        if (
            len(messages) >= 2
            and messages[-1]["role"] == "assistant"
            and messages[-2]["role"] == "user"
            and key not in seen
        ):
            seen.add(key)
            conversations.append((origin, messages))
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    partner = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    for index, (origin, messages) in enumerate(conversations):
        other = conversations[partner[index]][1][-1]["content"]
        pair = {"prompt": messages[:-1], "chosen": messages[-1]["content"], "rejected": other}
        yield origin, ("preference", pair)


def _cleaned(row: dict[str, Any], cfg: DataConfig, steps: list, report: DataReport) -> dict[str, Any]:
    prompt = row["prompt"]
    if cfg.system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": cfg.system_prompt}, *prompt]
    replies = [key for key in ("chosen", "rejected", "completion") if key in row]
    messages = prompt + [{"role": "assistant", "content": row[key]} for key in replies]
    cleaned = clean_conversation({"messages": messages, "text": ""}, steps, report)["messages"]
    out = {**row, "prompt": cleaned[: len(prompt)]}
    out.update({key: message["content"] for key, message in zip(replies, cleaned[len(prompt) :])})
    return out


def _conversations(row: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The conversations a row trains: prompt + chosen and prompt + rejected, or prompt + completion."""
    replies = ("chosen", "rejected") if "chosen" in row else ("completion",)
    return [[*row["prompt"], {"role": "assistant", "content": row[key]}] for key in replies]


# ---------------------------------------------------------------------------------------------- tokens


def reply_tokens(
    tokenizer: PreTrainedTokenizerBase, conversation: list[dict[str, Any]], reasoning: str
) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) of a conversation's last assistant turn: the tokens inference feeds the model, and the
    turn's trained span through its end-of-turn token (the last sample, which ends with that turn).

    Args:
        tokenizer: The tokenizer with the chat template that training uses.
        conversation: The prompt messages followed by one assistant reply.
        reasoning: `data.reasoning`: "drop" or "keep".

    Returns:
        (prompt ids, reply ids).
    """
    sample = conversation_samples(tokenizer, conversation, "", reasoning)[-1]
    start, end = sample.trained[-1]
    return list(sample.input_ids[:start]), list(sample.input_ids[start:end])


def tokenize_preferences(
    splits: DatasetDict, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, report: DataReport
) -> DatasetDict:
    """Each row's prompt and reply tokens (see the module docstring), the SFT view of its first conversation, and the
    length policy: a prompt that alone fills data.max_length is dropped; a reply that does not fit follows
    data.too_long (truncate: cut at its end, the prompt kept whole, its end-of-turn then untrained, which the audit
    reports; drop; error).

    Args:
        splits: The split rows from `load_preferences`.
        tokenizer: The tokenizer with the chat template that training uses.
        cfg: The `data:` section: max_length, too_long, reasoning.
        report: The data report, added to in place (dropped, truncated, split sizes, trained token share).

    Returns:
        The splits with prompt_ids, chosen_ids and rejected_ids (or completion_ids), and input_ids/labels of the
        first conversation.

    Raises:
        FinetuneError: A row does not fit `data.max_length` while `data.too_long` is "error", the chat template
            cannot render one, or a split is left empty.
    """
    tokenized = DatasetDict()
    for name, split in splits.items():
        rows = []
        for row in split:
            conversations = _conversations(row)
            try:
                parts = [reply_tokens(tokenizer, conversation, cfg.reasoning) for conversation in conversations]
            except FinetuneError as exc:
                raise FinetuneError(f"{row['origin']}: {exc}") from exc
            prompt_ids = parts[0][0]
            if any(prompt != prompt_ids for prompt, _ in parts[1:]):
                # The tokens of the prompt merge with the start of a reply: each reply would need its own prompt.
                report.dropped["the prompt's last tokens merge with a reply's first (no shared prompt tokens)"] += 1
                continue
            if len(prompt_ids) >= cfg.max_length:
                report.dropped["the prompt alone fills data.max_length (no reply token would be trained)"] += 1
                continue
            replies = [reply for _, reply in parts]
            room = cfg.max_length - len(prompt_ids)
            if any(len(reply) > room for reply in replies):
                if cfg.too_long == "error":
                    raise FinetuneError(
                        f"{row['origin']}: prompt and reply are longer than data.max_length={cfg.max_length}. Raise "
                        "max_length, or set data.too_long to 'drop' or 'truncate'."
                    )
                if cfg.too_long == "drop":
                    report.dropped["longer than data.max_length"] += 1
                    continue
                report.truncated += 1  # the reply's end is cut; the prompt is kept whole
                replies = [reply[:room] for reply in replies]
            reply_keys = ("chosen_ids", "rejected_ids") if "chosen" in row else ("completion_ids",)
            first = replies[0]
            rows.append(
                {
                    **row,
                    "messages": conversations[0],
                    "prompt_ids": prompt_ids,
                    **dict(zip(reply_keys, replies)),
                    "input_ids": prompt_ids + first,
                    "labels": [IGNORE_INDEX] * len(prompt_ids) + first,
                }
            )
        if not rows:
            raise FinetuneError(f"the {name} split is empty after applying data.max_length={cfg.max_length}.")
        tokenized[name] = Dataset.from_list(rows)
        report.splits[name] = len(rows)
    labels = tokenized["train"]["labels"] if "train" in tokenized else []
    total = sum(len(row) for row in labels)
    report.trained_token_share = sum(sum(1 for t in row if t != IGNORE_INDEX) for row in labels) / max(total, 1)
    return tokenized


def preference_findings(tokenizer: PreTrainedTokenizerBase, splits: DatasetDict, report: DataReport) -> list[Finding]:
    """The pitfalls preference data brings, checked on the tokens that will be trained.

    Checks that each reply ends at the end-of-turn token, that no reply starts with BOS or carries an extra EOS, that
    chosen and rejected differ, and how many rows the length limit dropped or cut.

    Args:
        tokenizer: The tokenizer the data was tokenized with.
        splits: The tokenized splits (checked on "train", else the first split).
        report: The data report (rows dropped and truncated).

    Returns:
        One Finding per check.
    """
    findings = []
    train = splits["train"] if "train" in splits else next(iter(splits.values()))
    stops = set(end_of_turn_ids(tokenizer))
    reply_keys = [key for key in ("chosen_ids", "rejected_ids", "completion_ids") if key in train.column_names]
    replies = [reply for key in reply_keys for reply in train[key]]
    unended = sum(1 for reply in replies if not reply or reply[-1] not in stops)
    findings.append(
        Finding(
            "warning" if unended else "ok",
            "reply ends at end of turn",
            f"{unended} of {len(replies)} training replies do not end with the end-of-turn token (cut by "
            "data.max_length): the model is not taught to stop there"
            if unended
            else "every training reply ends with the end-of-turn token, trained once (no EOS appended after it)",
        )
    )
    extra_eos = sum(
        1 for reply in replies if len(reply) > 1 and reply[-1] == tokenizer.eos_token_id and reply[-2] in stops
    )
    bos = tokenizer.bos_token_id
    with_bos = sum(1 for reply in replies if bos is not None and reply and reply[0] == bos)
    findings.append(
        Finding(
            "serious" if extra_eos or with_bos else "ok",
            "no stray BOS/EOS",
            f"{with_bos} replies start with BOS, {extra_eos} carry an EOS after the end-of-turn token",
        )
    )
    if "chosen_ids" in reply_keys:
        same_start = sum(1 for c, r in zip(train["chosen_ids"], train["rejected_ids"]) if c == r)
        findings.append(
            Finding(
                "warning" if same_start else "ok",
                "chosen differs from rejected",
                f"{same_start} pairs whose chosen and rejected replies are the same tokens after truncation"
                if same_start
                else "every pair's chosen and rejected replies differ in their tokens",
            )
        )
    dropped = report.dropped.get("the prompt alone fills data.max_length (no reply token would be trained)", 0)
    if dropped or report.truncated:
        findings.append(
            Finding(
                "warning",
                "length",
                f"{dropped} rows dropped because their prompt alone fills data.max_length; {report.truncated} rows' "
                "replies cut at data.max_length (the prompt's start is always kept). Raise data.max_length to keep them.",
            )
        )
    return findings


def prepare_preferences(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, paired: bool, enforce_audit: bool = True
) -> PreparedData:
    """The whole data stage of a preference recipe (see the module docstring).

    Args:
        cfg: The `data:` section.
        tokenizer: The tokenizer with the chat template that training uses.
        paired: True for dpo, orpo and simpo, False for kto.
        enforce_audit: Whether a "serious" finding stops the run as `data.audit` says; False to only report it.

    Returns:
        PreparedData: the tokenized splits and the DataReport with its findings.

    Raises:
        FinetuneError: The data cannot be loaded, split or tokenized, or the audit stops the run (`data.audit`).
    """
    from finetune.data import split_conversations  # the one splitter: seeded, disjoint, held-out sources kept apart

    report = DataReport()
    rows = split_conversations(load_preferences(cfg, report, paired=paired), cfg)
    for name, sources in (("validation", cfg.validation_sources), ("test", cfg.test_sources)):
        if sources:
            rows[name] = load_preferences(cfg, report, paired=paired, sources=sources)
    splits = tokenize_preferences(rows, tokenizer, cfg, report)
    # The supervised audit's end-of-turn check reads the SFT view (the chosen conversation, kept for scoring);
    # preference_findings checks every trained reply instead, rejected ones included.
    supervised = [
        f for f in audit(tokenizer, splits, report, reasoning=cfg.reasoning) if f.check != "end of turn trained"
    ]
    report.findings = supervised + preference_findings(tokenizer, splits, report)
    if enforce_audit:
        enforce(report.findings, cfg)
    return PreparedData(splits=splits, report=report)


def add_refusal_pairs(
    prepared: PreparedData, rows: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
) -> PreparedData:
    """The training split with the safety mix's preference rows (`finetune.safety.refusal_pairs`) added, cleaned and
    tokenized like the others and shuffled in with the seed (KTO reads its split in order).

    Args:
        prepared: The prepared data (`prepare_preferences`).
        rows: The refusal rows: prompt messages with chosen and rejected, or completion and label; and origin.
        tokenizer: The tokenizer with the chat template that training uses.
        cfg: The `data:` section: cleaning, max_length, too_long, reasoning, seed.

    Returns:
        PreparedData: the same splits with the rows in the training split; the report counts them (`safety_mix`).

    Raises:
        FinetuneError: A refusal row does not fit `data.max_length` while `data.too_long` is "error".
    """
    report = prepared.report
    steps = text_steps(cfg.clean)
    cleaned = [
        {**_cleaned({k: v for k, v in row.items() if k != "origin"}, cfg, steps, report), "tools": ""}
        | {"origin": row["origin"], "source": -2}
        for row in rows
    ]
    train = prepared.splits["train"]
    scratch = DataReport()  # the split sizes and token share below are the whole split's, not these rows'
    added = tokenize_preferences(DatasetDict({"train": Dataset.from_list(cleaned)}), tokenizer, cfg, scratch)["train"]
    report.dropped.update(scratch.dropped)
    report.truncated += scratch.truncated
    merged = concatenate_datasets([train, added.cast(train.features)]).shuffle(seed=cfg.seed).flatten_indices()
    report.safety_mix = len(added)
    report.splits["train"] = len(merged)
    return PreparedData(splits=DatasetDict({**prepared.splits, "train": merged}), report=report)
