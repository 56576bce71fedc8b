"""Pre-flight audit of prepared data, and `finetune data inspect`.

The audit checks the known silent killers of a fine-tune in one place: how many tokens carry loss, whether every
assistant turn's end-of-turn token is trained (or the model never learns to stop), a doubled BOS, pad == EOS,
truncation, rows without an assistant turn, and which chat template inference will use.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from datasets import DatasetDict
from rich.console import Console
from rich.table import Table
from rich.text import Text
from transformers import PreTrainedTokenizerBase

from finetune.config import DataConfig
from finetune.data.masks import IGNORE_INDEX, end_of_turn_ids, template_traits
from finetune.data.report import DataReport, Finding, PreparedData
from finetune.errors import FinetuneError

_NO_REPLY = "no assistant reply to train on (the last turn must be the assistant's)"


def audit(
    tokenizer: PreTrainedTokenizerBase, splits: DatasetDict, report: DataReport, *, reasoning: str = "drop"
) -> list[Finding]:
    """Pre-flight checks of tokenized data that would silently ruin a fine-tune: the share of tokens that carry loss,
    whether every assistant turn's end-of-turn token is trained, a doubled BOS, the pad token, truncation, rows
    without an assistant turn, the chat template, reasoning text and prompt length.

    Args:
        tokenizer: The tokenizer and chat template the data was tokenized with.
        splits: The tokenized splits (checked on "train", else the first split).
        report: The data report so far (loss share, rows dropped and truncated).
        reasoning: `data.reasoning`: "drop" or "keep" the reasoning text of assistant turns.

    Returns:
        One Finding per check, each "ok", "info", "warning" or "serious".
    """
    findings = []
    train = splits["train"] if "train" in splits else next(iter(splits.values()))
    chats = [row for row in train if row["messages"]]

    share = report.trained_token_share
    no_loss = report.dropped.get("no tokens carry loss", 0)
    level = "serious" if share == 0 else "warning" if share < 0.05 or no_loss else "ok"
    findings.append(
        Finding(level, "loss share", f"{share:.1%} of training tokens carry loss; {no_loss} rows had none (dropped).")
    )

    stops = end_of_turn_ids(tokenizer)
    if chats and not stops:
        findings.append(
            Finding(
                "serious",
                "end of turn trained",
                "the chat template closes an assistant turn with no special token, so the model cannot learn to stop. "
                "Set model.chat_template to 'chatml' (on a base model its <|im_start|>/<|im_end|> are added as special tokens and "
                "trained) or to a template that ends turns with an EOS-like token.",
            )
        )
    elif chats:
        allowed = set(stops) | {tokenizer.eos_token_id}
        missing = [
            row["origin"]
            for row in chats
            if any(row["input_ids"][end - 1] not in allowed for end in _segment_ends(row["labels"]))
        ]
        findings.append(
            Finding(
                "serious" if missing else "ok",
                "end of turn trained",
                f"{len(missing)} rows have an assistant turn whose end-of-turn token is not trained (e.g. {missing[0]})."
                if missing
                else f"every assistant turn ends with a trained {tokenizer.convert_ids_to_tokens(stops[0])}.",
            )
        )

    bos = tokenizer.bos_token_id
    if bos is not None:
        doubled = [row["origin"] for row in train if row["input_ids"][:2] == [bos, bos]]
        probe = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], tokenize=False
        )
        retokenized = tokenizer(probe).input_ids[:2] == [bos, bos]
        if doubled:
            findings.append(
                Finding(
                    "serious",
                    "double BOS",
                    f"{len(doubled)} rows start with two {tokenizer.bos_token} tokens (e.g. {doubled[0]}): the chat template writes BOS twice.",
                )
            )
        elif retokenized:
            findings.append(
                Finding(
                    "warning",
                    "double BOS",
                    f"the template writes {tokenizer.bos_token} and the tokenizer adds another when text is tokenized with special "
                    "tokens: finetune tokenizes without them, but a serving stack that re-tokenizes rendered prompts will double it.",
                )
            )
        else:
            findings.append(Finding("ok", "double BOS", "no conversation starts with a doubled BOS."))

    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id in {tokenizer.eos_token_id, *stops}:
        findings.append(
            Finding(
                "warning",
                "pad token",
                f"the pad token {tokenizer.pad_token} is also the end-of-turn/EOS token. finetune builds labels by position, so EOS "
                "stays trained here, but collators that mask pad ids (TRL's default path, many scripts) would stop teaching the "
                "model to stop. Give the tokenizer a distinct pad token.",
            )
        )
    else:
        findings.append(Finding("ok", "pad token", f"pad token {tokenizer.pad_token} differs from EOS."))

    kept = sum(report.splits.values())
    too_long = (
        report.truncated
        + report.dropped.get("longer than data.max_length", 0)
        + report.dropped.get("first reply alone is longer than data.max_length", 0)
    )
    rate = too_long / max(kept + too_long - report.truncated, 1)
    findings.append(
        Finding(
            "warning" if rate > 0.1 else "ok",
            "truncation",
            f"{rate:.1%} of conversations were longer than data.max_length ({report.truncated} truncated at a turn boundary, {too_long - report.truncated} dropped).",
        )
    )

    no_reply = report.invalid.get(_NO_REPLY, 0)
    if no_reply:
        findings.append(
            Finding(
                "warning",
                "rows without an assistant turn",
                f"{no_reply} rows have no assistant reply to learn from and were skipped.",
            )
        )

    for finding in (_reasoning_finding(tokenizer, chats, report, reasoning), _prompt_tokens_finding(tokenizer, report)):
        if finding is not None:
            findings.append(finding)

    template = tokenizer.chat_template or ""
    digest = hashlib.sha256(template.encode()).hexdigest()[:12]
    findings.append(
        Finding(
            "info",
            "chat template",
            f"training renders with template sha256:{digest}; it is saved with the adapter (chat_template.jinja), so inference uses exactly this template.",
        )
    )
    return findings


def _reasoning_finding(
    tokenizer: PreTrainedTokenizerBase, chats: list[dict], report: DataReport, policy: str
) -> Finding | None:
    """How earlier turns' reasoning reaches later ones (data.reasoning), when the data has any or the template
    rewrites earlier turns for it (Qwen3 gives only the latest turn a <think> block, empty when there is none)."""
    traits = template_traits(tokenizer)
    has_reasoning = any(
        m.get("reasoning_content") or "</think>" in m["content"] for row in chats for m in row["messages"]
    )
    if not has_reasoning and not (report.samples_added and not traits.keeps_earlier_reasoning):
        return None
    check = "earlier reasoning"
    if has_reasoning and not traits.renders_reasoning:
        return Finding(
            "warning",
            "reasoning",
            "rows carry reasoning, but the chat template writes none (it removes <think> blocks even from the latest "
            "turn), so no reasoning is trained. Set model.chat_template to a template that renders it.",
        )
    if traits.keeps_earlier_reasoning:
        return Finding(
            "info",
            check,
            "the chat template shows earlier turns' reasoning to later ones, so data.reasoning changes nothing.",
        )
    if policy == "keep":
        return Finding(
            "warning",
            check,
            "data.reasoning: keep: every earlier turn keeps its reasoning in one sample per conversation, but this chat "
            "template removes it at inference, so later turns learn from context they will not see. data.reasoning: drop is exact.",
        )
    return Finding(
        "info",
        check,
        "the chat template removes earlier turns' reasoning, as it will at inference (data.reasoning: drop): each such "
        f"turn is trained, with its own reasoning, in a sample that ends with it ({report.samples_added} extra samples; "
        "data.reasoning: keep trains one sample per conversation instead).",
    )


def _prompt_tokens_finding(tokenizer: PreTrainedTokenizerBase, report: DataReport) -> Finding | None:
    if not template_traits(tokenizer).prompt_merges_with_reply:
        return None
    return Finding(
        "warning",
        "prompt tokens",
        "the generation prompt's last tokens change when a reply follows them (e.g. a prompt ending in a blank line with a "
        "GPT-2-style tokenizer), so a whole conversation never shows the model the prompt tokens it gets at inference. Each "
        f"assistant turn is trained after exactly those tokens instead, in a sample of its own ({report.samples_added} extra "
        "samples). A template whose generation prompt ends with a special token or a single newline avoids the cost.",
    )


def _segment_ends(labels: list[int]) -> list[int]:
    """Positions just after each run of trained labels."""
    return [
        i + 1
        for i, label in enumerate(labels)
        if label != IGNORE_INDEX and (i + 1 == len(labels) or labels[i + 1] == IGNORE_INDEX)
    ]


def enforce(findings: list[Finding], cfg: DataConfig) -> None:
    """Stop the run on a "serious" audit finding unless `data.audit` is "warn".

    Args:
        findings: The audit's findings.
        cfg: The `data:` section (its `audit`).

    Raises:
        FinetuneError: A finding is "serious" and `data.audit` is "stop"; the message lists them.
    """
    serious = [f for f in findings if f.level == "serious"]
    if serious and cfg.audit == "stop":
        raise FinetuneError(
            "the data audit found problems that would silently ruin this fine-tune:\n  "
            + "\n  ".join(f"{f.check}: {f.message}" for f in serious)
            + "\nFix them, or set data.audit: warn to train anyway. `finetune data inspect` shows the details."
        )


# ---------------------------------------------------------------- inspect


@dataclass
class Inspection:
    """What `finetune data inspect` shows: the data report, token lengths, a few rendered rows and the chat template.

    Attributes:
        report: The DataReport of the prepared data, its audit findings included.
        lengths: Split name -> the token length of each of its rows.
        rendered: A few training rows, each as (text piece, whether it carries loss) pairs, one per token.
        template: The chat template inference will use ("" when the tokenizer has none).
        files: Name -> path of what `write` wrote (empty until then).
    """

    report: DataReport
    lengths: dict[str, list[int]]  # split -> token lengths
    rendered: list[list[tuple[str, bool]]]  # a few training rows as (text piece, carries loss)
    template: str
    files: dict[str, Path] = field(default_factory=dict)

    def print(self, console: Console) -> None:
        """Print the report, a histogram of token lengths, the audit, the rendered rows and the chat template.

        Args:
            console: The rich Console to print to.
        """
        for line in self.report.lines():
            console.print(f"  {line}")
        lengths = [n for values in self.lengths.values() for n in values]
        table = Table(title="Token lengths (all splits)")
        table.add_column("tokens", justify="right")
        table.add_column("rows", justify="right")
        table.add_column("")
        counts = _histogram(lengths)
        top = max((count for _, _, count in counts), default=1)
        for low, high, count in counts:
            table.add_row(f"{low}-{high}", str(count), "█" * round(30 * count / max(top, 1)))
        console.print(table)
        audit_table = Table(title="Pre-flight audit")
        for column in ("level", "check", "finding"):
            audit_table.add_column(column)
        colours = {"ok": "green", "info": "blue", "warning": "yellow", "serious": "bold red"}
        for finding in self.report.findings:
            audit_table.add_row(Text(finding.level, style=colours[finding.level]), finding.check, finding.message)
        console.print(audit_table)
        console.print("Rows as the model sees them ([bold green]green[/] tokens carry loss):")
        for pieces in self.rendered:
            text = Text()
            for piece, trained in pieces:
                text.append(piece, style="bold green" if trained else "dim")
            console.print(text)
            console.rule(style="dim")
        console.print(f"Chat template inference will use:\n{self.template}", markup=False, highlight=False)

    def write(self, out_dir: Path) -> dict[str, Path]:
        """inspect.json, inspect.md and lengths.png in out_dir.

        Args:
            out_dir: The folder to write into (created if missing).

        Returns:
            Name -> path of the three files written (also kept in `files`).
        """
        from matplotlib.figure import Figure  # no pyplot: the caller's backend and figures are untouched

        out_dir.mkdir(parents=True, exist_ok=True)
        figure = Figure(figsize=(7, 3.5))
        axis = figure.subplots()
        axis.hist(list(self.lengths.values()), bins=30, stacked=True, label=list(self.lengths))
        axis.set_xlabel("tokens per conversation")
        axis.set_ylabel("rows")
        axis.legend()
        figure.tight_layout()
        figure.savefig(out_dir / "lengths.png", dpi=100)
        summary = {
            "report": self.report.lines(),
            "formats": dict(self.report.formats),
            "invalid": dict(self.report.invalid),
            "dropped": dict(self.report.dropped),
            "cleaned": dict(self.report.cleaned),
            "findings": [finding.__dict__ for finding in self.report.findings],
            "lengths": {
                name: {"rows": len(v), "max": max(v), "mean": sum(v) / len(v)} for name, v in self.lengths.items() if v
            },
        }
        (out_dir / "inspect.json").write_text(json.dumps(summary, indent=2))
        markdown = [
            "# Data inspection",
            "",
            *[f"- {line}" for line in self.report.lines()],
            "",
            "![token lengths](lengths.png)",
            "",
            "## Pre-flight audit",
            "",
            "| level | check | finding |",
            "|---|---|---|",
        ]
        markdown += [f"| {f.level} | {f.check} | {f.message.replace('|', '/')} |" for f in self.report.findings]
        markdown += ["", "## Rows as the model sees them", "", "Text between ⟪ and ⟫ carries loss.", ""]
        for pieces in self.rendered:
            markdown += ["```", "".join(f"⟪{p}⟫" if trained else p for p, trained in _merge(pieces)), "```", ""]
        markdown += ["## Chat template", "", "```jinja", self.template, "```", ""]
        (out_dir / "inspect.md").write_text("\n".join(markdown))
        self.files = {name: out_dir / name for name in ("inspect.json", "inspect.md", "lengths.png")}
        return self.files


def _merge(pieces: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    merged: list[tuple[str, bool]] = []
    for piece, trained in pieces:
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + piece, trained)
        else:
            merged.append((piece, trained))
    return merged


def _histogram(values: list[int], bins: int = 10) -> list[tuple[int, int, int]]:
    if not values:
        return []
    low, high = min(values), max(values)
    width = max(1, -(-(high - low + 1) // bins))
    counts = Counter((v - low) // width for v in values)
    return [
        (low + b * width, low + (b + 1) * width - 1, counts.get(b, 0)) for b in range(-(-(high - low + 1) // width))
    ]


def summarize(prepared: PreparedData, tokenizer: PreTrainedTokenizerBase, show_rows: int = 3) -> Inspection:
    """An Inspection of prepared data: its report, token lengths per split and the first rows rendered.

    Args:
        prepared: The prepared data.
        tokenizer: The tokenizer that tokenized it (to decode each token).
        show_rows: How many training rows (else rows of the first split) to render token by token.

    Returns:
        The Inspection (nothing written yet).
    """
    train = prepared.splits["train"] if "train" in prepared.splits else next(iter(prepared.splits.values()))
    rendered = []
    for row in train.select(range(min(show_rows, len(train)))):
        rendered.append(
            [
                (tokenizer.decode([token]), label != IGNORE_INDEX)
                for token, label in zip(row["input_ids"], row["labels"])
            ]
        )
    lengths = {name: [len(ids) for ids in split["input_ids"]] for name, split in prepared.splits.items()}
    return Inspection(
        report=prepared.report, lengths=lengths, rendered=rendered, template=tokenizer.chat_template or ""
    )
