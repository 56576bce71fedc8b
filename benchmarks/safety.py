"""Responsible output before and after fine-tuning, and what each fix does: refusals, over-refusals, toxicity.

    .venv/bin/python benchmarks/safety.py                 # trains the arms, generates, scores (~45 min on 2 cores)
    .venv/bin/python benchmarks/safety.py --score-only    # rescore the recorded replies (after changing the detector)

The bundled SmolLM2-135M-Instruct is fine-tuned with recipes/quickstart.yaml (QLoRA, chatterbot-corpus, 24 steps) in
these arms, each through the library's own stages (`ChatSFTRecipe.setup/train/save`):

  plain          the quickstart as it is
  clean          + data.clean.toxicity: 0.5 (training conversations whose assistant turns the classifier flags dropped)
  mix 10%        + data.safety_mix: 0.1 (HarmBench requests with refusals, 10% of the training split)
  mix 25%        + data.safety_mix: 0.25

and two preference arms, each continuing the plain arm's adapter (runs/safety-plain) with recipes/quickstart-dpo.yaml
(DPO, chatterbot pairs: each real reply chosen over another conversation's; `PreferenceRecipe.setup/train/save`):

  dpo                        the DPO recipe as it is
  dpo + refusal pairs 25%    + data.safety_mix: 0.25 (HarmBench requests, a refusal chosen over the plain arm's own
                             reply to each, 25% of the training split)
  dpo + refusal pairs 25%, lr 5e-4    the same at the SFT recipe's learning rate instead of the DPO recipe's 5e-5

`--keep` keeps the arms already recorded in benchmarks/results/safety_replies.json (the base's replies included) and
trains only those named with --arms; a preference arm then continues the recorded plain arm's run folder.

Every arm and the base model (the first arm's model with its adapter switched off) answer the same prompts of the
three safety sets (`finetune.safety.safety_prompts`: their evaluation parts, never those the detector was tuned on;
HarmBench, the mix's requests, is never evaluated on); harmless requests the quickstart trains on are left out. Each
rate's change from the base comes with its 95% paired bootstrap interval (`finetune.metrics.intervals`). Held-out
perplexity on the quickstart's test split says what each fix costs the chat itself.

The replies are kept (benchmarks/results/safety_replies.json), so the rates can be recomputed with `--score-only`;
replies to development prompts (base and mix 25%) are the pool the detector's labelled sample was drawn from.
Results: benchmarks/results/safety.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import OFFLINE, RESULTS, machine, machine_markdown, write  # noqa: E402

os.environ.update({k: os.environ.get(k, v) for k, v in OFFLINE.items()})
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"
REPLIES = RESULTS / "safety_replies.json"

ARMS: dict[str, list[str]] = {
    "plain": [],
    "clean": ["data.clean.toxicity=0.5"],
    "mix 10%": ["data.safety_mix=0.1"],
    "mix 25%": ["data.safety_mix=0.25"],
}
PREFERENCE_RECIPE = ROOT / "recipes" / "quickstart-dpo.yaml"
PREFERENCE_ARMS: dict[str, list[str]] = {
    "dpo": [],
    "dpo + refusal pairs 25%": ["data.safety_mix=0.25"],
    "dpo + refusal pairs 25%, lr 5e-4": ["data.safety_mix=0.25", "training.learning_rate=5e-4"],
}
PLAIN_RUN = ROOT / "runs" / "safety-plain"  # the plain arm's run folder, which the preference arms continue
DEV_ARMS = ("base", "mix 25%")  # replies to development prompts, the pool of the detector's labelled sample


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=120, help="Prompts per safety set (evaluation part).")
    parser.add_argument("--arms", nargs="*", default=[*ARMS, *PREFERENCE_ARMS], help="Arms to train (default: all).")
    parser.add_argument("--keep", action="store_true", help="Keep the recorded arms; train only --arms.")
    parser.add_argument("--score-only", action="store_true", help="Only rescore the recorded replies.")
    return parser.parse_args()


def _user_turns(split: Any) -> list[str]:
    return [m["content"] for messages in split["messages"] for m in messages if m["role"] == "user"]


def generate(args: argparse.Namespace) -> dict[str, Any]:
    """Train each arm, and record every model's replies to the safety prompts, with timings and perplexity."""
    from finetune import safety
    from finetune.config import RecipeConfig
    from finetune.recipes import Recipe

    record: dict[str, Any] = {"machine": machine(), "prompts_per_set": args.prompts, "arms": {}}
    prompts = dev = None
    if args.keep:
        record = json.loads(REPLIES.read_text())
        record["machine_of_kept_arms"] = record["machine"]
        record["machine"] = machine()
        prompts = record["prompts"]
    started = time.perf_counter()
    for arm in args.arms:
        slug = "".join(c for c in arm if c.isalnum() or c == "-")
        # float32: the arms recorded before `compute_dtype: auto` could pick bf16 computed in it, and a preference
        # arm's change from the plain arm must not include a change of dtype.
        overrides = [
            f"name=safety-{slug}",
            "output.overwrite=true",
            "evaluation.safety=false",
            "model.compute_dtype=float32",
        ]
        if arm in PREFERENCE_ARMS:
            if not (PLAIN_RUN / "adapter").is_dir():
                raise SystemExit(f"{arm} continues the plain arm's run: train it first (--arms plain ...)")
            config = RecipeConfig.from_yaml(
                PREFERENCE_RECIPE, [*PREFERENCE_ARMS[arm], *overrides, f"model.adapter={PLAIN_RUN}"]
            )
        else:
            config = RecipeConfig.from_yaml(RECIPE, [*ARMS[arm], *overrides])
        recipe = Recipe.for_config(config)
        recipe.setup()
        cfg = config.evaluation
        if prompts is None:
            # The quickstart's own training questions are not harmless requests it was never shown (every arm trains
            # on the same split: the clean arm on fewer of its rows, the mix arms on more).
            prompts = safety.safety_prompts(cfg, exclude=_user_turns(recipe.data.splits["train"]), limit=args.prompts)
            dev = safety.safety_prompts(cfg, which="dev", limit=1000)
            dev = {rate: dev[rate] for rate in (safety.REFUSAL, safety.OVER_REFUSAL)}
            record["prompts"] = prompts
            record["max_new_tokens"] = cfg.safety_max_new_tokens
        outcome = recipe.train()
        recipe.save()
        models = (recipe.model, recipe.tokenizer, recipe.data.splits["test"])

        if "base" not in record["arms"]:  # the bundled model: a preference arm's adapter off is the plain arm's
            if arm in PREFERENCE_ARMS:
                raise SystemExit("the base's replies come from an SFT arm: train one before the preference arms")
            record["arms"]["base"] = _measure(*models, "base", prompts, dev, cfg, base=True)
        record["arms"][arm] = {
            **_measure(*models, arm, prompts, dev, cfg, base=False),
            "train_seconds": round(outcome.seconds, 1),
            "train_loss": outcome.loss,
            "train_rows": len(recipe.data.splits["train"]),
            "data": recipe.data.report.lines(),
            "recipe": "recipes/quickstart-dpo.yaml after plain"
            if arm in PREFERENCE_ARMS
            else "recipes/quickstart.yaml",
        }
        recipe.cleanup()
        del recipe, models
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    REPLIES.write_text(json.dumps(record, indent=1) + "\n")
    return record


def _measure(
    model: Any, tokenizer: Any, test: Any, name: str, prompts: Any, dev: Any, cfg: Any, *, base: bool
) -> dict[str, Any]:
    """One model's replies to the safety prompts (and, for `DEV_ARMS`, to the development ones), with the time they
    took and the held-out perplexity; `base`: the adapter switched off."""
    from contextlib import nullcontext

    from finetune import evaluation, safety

    with model.disable_adapter() if base else nullcontext():
        timer = time.perf_counter()
        replies = safety.safety_replies(model, tokenizer, prompts, cfg)
        seconds = time.perf_counter() - timer
        nll = evaluation.nll(model, test, pad_token_id=tokenizer.pad_token_id, batch_size=16)
        out = {
            "replies": replies.replies,
            "generation_seconds": round(seconds, 1),
            "perplexity": nll.metrics()["perplexity"],
        }
        if name in DEV_ARMS:
            out["dev_replies"] = safety.safety_replies(model, tokenizer, dev, cfg).replies
    print(f"{name}: {seconds:.0f} s for {sum(map(len, prompts.values()))} safety prompts", flush=True)
    return out


def score(record: dict[str, Any]) -> dict[str, Any]:
    """Each arm's three rates against the base's, with 95% paired bootstrap intervals."""
    from finetune import safety
    from finetune.metrics.intervals import compare

    base = safety.SafetyReplies(record["arms"]["base"]["replies"]).rows()
    plain = safety.SafetyReplies(record["arms"]["plain"]["replies"]).rows() if "plain" in record["arms"] else None
    results: dict[str, Any] = {}
    for arm, data in record["arms"].items():
        rows = safety.SafetyReplies(data["replies"]).rows()
        results[arm] = {
            "rates": {rate: scores.score() for rate, scores in rows.items()},
            "changes": [] if arm == "base" else [change.as_dict() for change in compare(base, rows)],
            # A preference arm continues the plain arm: what it moved, from there.
            "changes_from_plain": [change.as_dict() for change in compare(plain, rows)]
            if arm in PREFERENCE_ARMS
            else [],
            "perplexity": data["perplexity"],
            "generation_seconds": data["generation_seconds"],
            **{key: data[key] for key in ("train_seconds", "train_loss", "train_rows", "data") if key in data},
        }
    return results


def _cell(rate: float, change: dict[str, Any] | None) -> str:
    counts = f"{rate:.1%}"
    if change is None:
        return counts
    if change["verdict"] == "unchanged":
        return f"{counts} (unchanged)"
    interval = f"{change['change'] * 100:+.1f} pts, 95% CI {change['low'] * 100:+.1f} to {change['high'] * 100:+.1f}"
    if change["relative"]:
        interval = f"{change['change']:+.0%} relative, 95% CI {change['low']:+.0%} to {change['high']:+.0%}"
    return f"{counts} ({interval}; {change['verdict']})"


def markdown(record: dict[str, Any], results: dict[str, Any]) -> str:
    from finetune import safety

    counts = {rate: len(prompts) for rate, prompts in record["prompts"].items()}
    lines = [
        "# Responsible output: plain fine-tuning and the three fixes",
        "",
        "SmolLM2-135M-Instruct fine-tuned with recipes/quickstart.yaml (QLoRA, chatterbot-corpus, 24 steps of 8 "
        "conversations); every arm and the base answer the same prompts greedily (repetition guard on, "
        f"{record.get('max_new_tokens', 32)} new tokens). Change from the base with its 95% paired bootstrap interval "
        "(absolute, in percentage points); better or worse only where the interval excludes no change.",
        "",
        "| arm | " + " | ".join(f"{rate} (n={counts[rate]})" for rate in safety.RATES) + " | held-out perplexity |",
        "|---|" + "---:|" * (len(safety.RATES) + 1),
    ]
    for arm, result in results.items():
        changes = {change["metric"]: change for change in result["changes"]}
        cells = [_cell(result["rates"][rate], changes.get(rate)) for rate in safety.RATES]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {result['perplexity']:.2f} |")
    preference = {arm: result for arm, result in results.items() if result["changes_from_plain"]}
    if preference:
        lines += [
            "",
            "The preference arms continue the plain arm (recipes/quickstart-dpo.yaml on its adapter); their change from "
            "the plain arm, with its 95% paired bootstrap interval:",
            "",
            "| arm | " + " | ".join(safety.RATES) + " |",
            "|---|" + "---:|" * len(safety.RATES),
        ]
        for arm, result in preference.items():
            changes = {change["metric"]: change for change in result["changes_from_plain"]}
            lines.append(
                f"| {arm} | "
                + " | ".join(_cell(result["rates"][rate], changes.get(rate)) for rate in safety.RATES)
                + " |"
            )
    dev = {arm: data["dev_replies"] for arm, data in record["arms"].items() if "dev_replies" in data}
    if dev:
        lines += [
            "",
            "On the development prompts (the detector's labelled sample; chatterbot's coding questions such as \"can you "
            'write a sorting algorithm?" are among them, where the evaluation part leaves them out as training data):',
            "",
            "| model | harmful requests refused | harmless requests refused |",
            "|---|---:|---:|",
        ]
        for arm, replies in dev.items():
            cells = []
            for rate in (safety.REFUSAL, safety.OVER_REFUSAL):
                refused = sum(safety.is_refusal(row["reply"]) for row in replies[rate])
                cells.append(f"{refused} / {len(replies[rate])}")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "What each set is:", ""]
    lines += [f"- `{rate}`: {safety.WHAT[rate]}; {safety.SOURCES[rate]}." for rate in safety.RATES]
    lines += ["", "Training data and cost per arm:", ""]
    for arm, result in results.items():
        if arm == "base":
            lines.append(f"- base: safety prompts answered in {result['generation_seconds']:.0f} s.")
            continue
        extra = [line for line in result["data"] if "toxic" in line or "refusal examples" in line]
        lines.append(
            f"- {arm}: {result['train_rows']} training rows, {result['train_seconds']:.0f} s of training, final "
            f"training loss {result['train_loss']:.3f}; safety prompts answered in {result['generation_seconds']:.0f} s"
            + (f"; {'; '.join(extra)}" if extra else "")
            + "."
        )
    lines += ["", machine_markdown(record["machine"]), "", "![rates with their intervals](safety.png)", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    from finetune import safety

    arms = list(results)
    figure = Figure(figsize=(9, 3.6))
    for position, rate in enumerate(safety.RATES):
        axes = figure.add_subplot(1, len(safety.RATES), position + 1)
        base = results["base"]["rates"][rate]
        for index, arm in enumerate(arms):
            value = results[arm]["rates"][rate]
            change = next((c for c in results[arm]["changes"] if c["metric"] == rate), None)
            error = None
            if change is not None:  # the change's interval, drawn around the arm's rate
                low, high = (
                    (base * (1 + change["low"]), base * (1 + change["high"]))
                    if change["relative"]
                    else (
                        base + change["low"],
                        base + change["high"],
                    )
                )
                error = [[max(0.0, value - low) * 100], [max(0.0, high - value) * 100]]
            colour = {"better": "#2a9d3a", "worse": "#c0392b"}.get(change["verdict"] if change else "", "#888888")
            axes.bar(index, value * 100, color=colour, yerr=error, capsize=3)
        axes.set_xticks(range(len(arms)))
        axes.set_xticklabels(arms, rotation=35, ha="right", fontsize=8)
        axes.set_title(rate, fontsize=9)
        axes.set_ylabel("% of prompts" if position == 0 else "")
    figure.suptitle("SmolLM2-135M-Instruct, quickstart fine-tune: change from base with 95% interval", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")


def main() -> None:
    args = arguments()
    record = json.loads(REPLIES.read_text()) if args.score_only else generate(args)
    results = score(record)
    summary = {key: value for key, value in record.items() if key not in ("arms", "prompts")}
    write("safety", {**summary, "results": results}, markdown(record, results))
    plot(results, RESULTS / "safety.png")
    print((RESULTS / "safety.md").read_text())


if __name__ == "__main__":
    main()
