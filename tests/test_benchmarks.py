"""The benchmark harness's arithmetic: ratios, time to the baseline's loss, targets and tables (the runs themselves
are benchmarks, not tests)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_speed():
    spec = importlib.util.spec_from_file_location("train_speed", ROOT / "benchmarks" / "train_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_speed"] = module
    spec.loader.exec_module(module)
    return module


# A machine description as benchmarks/_harness.machine writes it.
MACHINE = {
    "cpu": "test",
    "cores": 2,
    "torch_threads": 2,
    "memory_gib": 1,
    "gpu": None,
    "load_average_1min": 0,
    "python": "3",
    "torch": "2",
    "transformers": "5",
    "trl": "1",
}


def run(variant, seconds, tokens, trained, assistant, rss, curve, checkpointing=False):
    return {
        "variant": variant,
        "train_seconds": seconds,
        "tokens": tokens,
        "positions": tokens * 2 if variant == "baseline" else tokens,
        "trained_tokens": trained,
        "assistant_tokens": assistant,
        "peak_rss_gib": rss,
        "peak_cuda_gib": None,
        "gradient_checkpointing": checkpointing,
        "matmul_params": 1_000_000,
        "curve": curve,
        "val_loss": curve[-1]["val_loss"],
        "val_loss_all_tokens": curve[-1]["val_loss"],
    }


def test_ratios_targets_and_time_to_the_baseline_loss(train_speed):
    baseline = train_speed.summarize(
        run(
            "baseline",
            100.0,
            5000,
            4800,
            1500,
            4.0,
            [
                {"step": 0, "train_seconds": 0, "val_loss": 4.0},
                {"step": 4, "train_seconds": 50, "val_loss": 3.6},
                {"step": 8, "train_seconds": 100, "val_loss": 3.5},
            ],
            checkpointing=True,
        ),
        tflops=1.0,
    )
    library = train_speed.summarize(
        run(
            "library",
            25.0,
            5000,
            1500,
            1500,
            3.0,
            [
                {"step": 0, "train_seconds": 0, "val_loss": 4.0},
                {"step": 4, "train_seconds": 12, "val_loss": 3.55},
                {"step": 8, "train_seconds": 25, "val_loss": 3.2},
            ],
        ),
        tflops=1.0,
    )
    assert baseline["padding_share"] == pytest.approx(0.5) and library["padding_share"] == 0
    # utilisation: tokens x FLOPs per token (6 with checkpointing, else 4) x params / time / rate
    assert baseline["utilisation"] == pytest.approx(5000 * 6e6 / 100 / 1e12)
    result = train_speed.compare(baseline, library)
    ratios, targets = result["ratios"], result["targets"]
    assert ratios["wall_time"] == pytest.approx(0.25) and ratios["peak_memory"] == pytest.approx(0.75)
    assert ratios["assistant_tokens_per_s"] == pytest.approx(4.0)
    assert ratios["trained_tokens_per_s"] == pytest.approx(1500 / 25 / (4800 / 100))
    # first validation of (b) at or below (a)'s final 3.5 is at step 8 (25 s): no interpolation
    assert ratios["time_to_baseline_val_loss"] == pytest.approx(0.25)
    assert targets["assistant-reply tokens/s >= 1.5x"] and not targets["loss-carrying tokens/s >= 1.5x"]
    never = train_speed.time_to_reach(library["curve"], 3.0)
    assert never is None


def test_lever_table_has_a_row_per_run_relative_to_all_on(train_speed):
    curve = [{"step": 0, "train_seconds": 0, "val_loss": 4.0}, {"step": 4, "train_seconds": 10, "val_loss": 3.5}]
    entry = {"all levers on": train_speed.summarize(run("library", 10.0, 1000, 300, 300, 3.0, curve), 1.0)}
    for label, _ in train_speed.LEVERS:
        entry[label] = train_speed.summarize(run("library", 15.0, 1000, 300, 300, 3.5, curve), 1.0)
    payload = {
        "machine": MACHINE,
        "matmul_rates": {"float32": 0.2, "bfloat16": 0.1},
        "matmul_tflops": 0.2,
        "matmul_dtype": "float32",
        "command": "python benchmarks/train_speed.py --levers",
        "settings": {"model": "m", "lora_r": 16, "steps": 4, "batch_size": 8, "max_length": 256, "data": "sessions"},
        "results": {"none": entry},
    }
    table = train_speed.levers_markdown(payload)
    assert table.count("| 1.50x |") == len(train_speed.LEVERS) and "| all levers on | 10.0 |" in table
    assert "float32 200, bfloat16 100" in table and "Data: **sessions**" in table


def test_speed_table_has_a_column_and_a_ratio_per_compute_dtype(train_speed):
    curve = [{"step": 0, "train_seconds": 0, "val_loss": 4.0}, {"step": 4, "train_seconds": 10, "val_loss": 3.0}]
    baseline = train_speed.summarize(run("baseline", 40.0, 1000, 900, 300, 4.0, curve), 1.0)
    entry = {"baseline": {**baseline, "compute_dtype": "float32"}}
    for dtype, seconds in (("float32", 20.0), ("bfloat16", 10.0)):
        entry[f"library {dtype}"] = {
            **train_speed.summarize(run("library", seconds, 1000, 300, 300, 3.0, curve), 1.0),
            "compute_dtype": dtype,
        }
    entry["comparison"] = {label: train_speed.compare(entry["baseline"], entry[label]) for label in list(entry)[1:]}
    payload = {
        "machine": MACHINE,
        "matmul_rates": {"float32": 0.1, "bfloat16": 0.4},
        "matmul_tflops": 0.4,
        "matmul_dtype": "bfloat16",
        "command": "python benchmarks/train_speed.py --data sessions",
        "settings": {
            "model": "m",
            "lora_r": 16,
            "steps": 4,
            "batch_size": 4,
            "max_length": 1024,
            "learning_rate": 3e-4,
            "data": "sessions",
        },
        "results": {"4bit": entry},
    }
    table = train_speed.markdown(payload)
    header = "| figure | (a) TRL baseline | (b) finetune, float32 | (c) finetune, bfloat16 | b/a | c/a |"
    assert header in table and "| wall time, training (s) | 40.0 | 20.0 | 10.0 | 0.50 | 0.25 |" in table
    # every row has as many cells as the header
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert {line.count(" | ") for line in rows} == {header.count(" | ")}
    assert "Data: **sessions**" in table and "the fastest, bfloat16 (400 GFLOP/s)" in table


def test_child_arguments_drop_the_parents_quantization_list(train_speed):
    argv = ["--steps", "4", "--quantization", "4bit", "none", "--set", "lora.r=8"]
    assert train_speed._without(argv, "--quantization") == ["--steps", "4", "--set", "lora.r=8"]


# ---------------------------------------------------------------- benchmarks/quality.py: tasks, split, scoring


@pytest.fixture(scope="module")
def quality():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = module
    spec.loader.exec_module(module)
    return module


FOLDOC = """00-database-info
     This file was converted by dictfmt.

Abend
\t
   <operating system> {ABnormal END}.  A program crash.

   Further reading: {crash}.

   (1996-01-01)

A-0

   <language> One of the first compilers, for the {UNIVAC}
   I (1952).

"""


def test_foldoc_entries_keep_the_first_paragraph_without_markup(quality):
    entries = quality.quality_tasks.foldoc_entries(FOLDOC)
    assert entries == [
        ("Abend", "ABnormal END.  A program crash."),
        ("A-0", "One of the first compilers, for the UNIVAC I (1952)."),
    ]


LINKED = """crash

   <programming> A sudden failure, e.g. of {Abend}.

   (1999-01-01)

Abend

   {ABnormal END}.  See {crash}.

   Second paragraph, about {UNIVAC}.

   (1996-01-01)

"""


def test_linked_entries_keep_every_paragraph_and_read_the_links(quality):
    entries = quality.quality_tasks.foldoc_linked_entries(LINKED)
    assert entries["Abend"] == (
        "ABnormal END.  See crash.\n\nSecond paragraph, about UNIVAC.",
        ["ABnormal END", "crash", "UNIVAC"],
    )
    assert entries["crash"] == ("A sudden failure, e.g. of Abend.", ["Abend"])


def test_sessions_follow_links_between_entries_within_the_size(quality):
    entries = quality.quality_tasks.foldoc_linked_entries(LINKED)
    chats = quality.quality_tasks.foldoc_sessions(entries, sessions=5, max_chars=10_000, seed=0)
    assert len(chats) == 2  # one per term that links to another entry
    for chat in chats:
        assert [m["role"] for m in chat] == ["user", "assistant"] * 2  # crash <-> Abend, then no unseen link left
        assert chat[0]["content"] in ("What is crash?", "What is Abend?")
        other = "Abend" if chat[0]["content"] == "What is crash?" else "crash"
        assert other in chat[2]["content"] and chat[3]["content"] == entries[other][0]
    short = quality.quality_tasks.foldoc_sessions(entries, sessions=5, max_chars=40, seed=0)
    assert all(len(chat) == 2 for chat in short)  # the first reply is always kept; the next would not fit


def mo_file(pairs: dict[str, str], order: str = "<") -> bytes:
    """A GNU .mo file as msgfmt writes it: header, two (length, offset) tables, then the strings."""
    import struct

    keys = sorted(pairs)
    header = 28
    strings = b""
    originals, translations = [], []
    table_end = header + 16 * len(keys)
    for key in keys:
        originals.append((len(key.encode()), table_end + len(strings)))
        strings += key.encode() + b"\0"
    for key in keys:
        translations.append((len(pairs[key].encode()), table_end + len(strings)))
        strings += pairs[key].encode() + b"\0"
    out = struct.pack(order + "7I", 0x950412DE, 0, len(keys), header, header + 8 * len(keys), 0, 0)
    for length, offset in originals + translations:
        out += struct.pack(order + "2I", length, offset)
    return out + strings


@pytest.mark.parametrize("order", ["<", ">"])
def test_mo_catalogue_reads_either_byte_order_and_skips_header_plurals_contexts(quality, order):
    pairs = {
        "": "Content-Type: text/plain; charset=UTF-8\n",
        "missing operand": "opérande manquant",
        "%d file\0%d files": "%d fichier\0%d fichiers",
        "menu\x04Open": "Ouvrir",
    }
    catalogue = quality.quality_tasks.mo_catalogue(mo_file(pairs, order))
    assert catalogue == {"missing operand": "opérande manquant"}
    with pytest.raises(ValueError, match="not a GNU .mo file"):
        quality.quality_tasks.mo_catalogue(b"\0" * 28)


def test_split_is_by_conversation_seeded_and_only_fitting_chats(quality, chatml_tokenizer):
    tasks = quality.quality_tasks
    chats = [tasks.exchange(f"question {i}", "answer " * (2 if i % 5 else 200)) for i in range(60)]
    train, test = tasks.split(chats, chatml_tokenizer, max_length=64, test_rows=8, train_rows=100, seed=0)
    assert len(test) == 8 and len(train) == 48 - 8  # every fifth chat is too long for 64 tokens
    assert not {c[0]["content"] for c in test} & {c[0]["content"] for c in train}
    assert all(len(tasks.reply_tokens(chatml_tokenizer, c)[0]) <= 64 for c in train + test)
    again = tasks.split(chats, chatml_tokenizer, max_length=64, test_rows=8, train_rows=100, seed=0)
    assert again == (train, test)


def test_reply_perplexity_scores_only_the_last_reply(quality, tiny_llama_dir, chatml_tokenizer):
    import math

    import torch
    from transformers import AutoModelForCausalLM

    tasks = quality.quality_tasks
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    chats = [
        [*tasks.exchange("hi", "hello there"), *tasks.exchange("and you?", "fine, thanks")],
        tasks.exchange("What is 2+2?", "4, of course; said at some length to make the rows differ in width"),
    ]
    ids, start = tasks.reply_tokens(chatml_tokenizer, chats[0])
    assert chatml_tokenizer.decode(ids[start:]) == "fine, thanks<|im_end|>\n"
    # by hand, one conversation at a time: transformers' own shifted loss over the reply's positions only
    total = count = 0
    for chat in chats:
        ids, start = tasks.reply_tokens(chatml_tokenizer, chat)
        labels = torch.tensor([[-100] * start + ids[start:]])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=labels).loss
        total, count = total + float(loss) * (len(ids) - start), count + len(ids) - start
    assert tasks.reply_perplexity(model, chatml_tokenizer, chats, batch_size=2) == pytest.approx(
        math.exp(total / count), rel=1e-4
    )


def test_budget_schedule_runs_warmup_and_cosine_over_cpu_seconds_and_saves_at_quarters(quality, tmp_path, monkeypatch):
    from types import SimpleNamespace

    clock = {"now": 100.0}
    monkeypatch.setattr(quality.time, "process_time", lambda: clock["now"])
    budget = quality.budget_callback(40.0, 1e-3, 0.1, tmp_path, conversations_per_step=4)
    optimizer = SimpleNamespace(param_groups=[{"lr": 0.0}])
    saved = []
    model = SimpleNamespace(save_pretrained=saved.append)
    budget.on_train_begin()
    rates = []
    for step, seconds in enumerate([2, 4, 20, 31, 40], start=1):
        clock["now"] = 100.0 + seconds
        budget.on_pre_optimizer_step(None, None, None, optimizer=optimizer)
        rates.append(optimizer.param_groups[0]["lr"])
        control = SimpleNamespace(should_training_stop=False)
        budget.on_step_end(None, SimpleNamespace(global_step=step), control, model=model)
    assert rates[0] == pytest.approx(5e-4) and rates[1] == pytest.approx(1e-3)  # warmup: 10% of 40 s
    assert rates[2] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (0.5 - 0.1) / 0.9)))
    assert rates[4] == pytest.approx(0.0, abs=1e-12)
    # 10 s and 20 s are passed at the step ending at 20 s; 30 s at 31 s; 40 s at the end, which stops training
    assert [p["steps"] for p in budget.saved] == [3, 3, 4, 5] and [p["conversations"] for p in budget.saved] == [
        12,
        12,
        16,
        20,
    ]
    assert saved == [tmp_path / f"point{i}" for i in range(1, 5)] and control.should_training_stop


def test_quality_table_marks_where_the_recipe_is_ahead(quality):
    def arm(values):
        curve = [{"cpu_seconds": 0.0, "steps": 0, "conversations": 0, "perplexity": 20.0}]
        curve += [
            {"cpu_seconds": 15.0 * i, "steps": i, "conversations": 4 * i, "perplexity": v}
            for i, v in enumerate(values, 1)
        ]
        return {"settings": quality.PLAIN, "wall_seconds": 1, "curve": curve}

    payload = {
        "name": "quality",
        "commands": ["python benchmarks/quality.py"],
        "machine": {**MACHINE, "torch_threads": 1},
        "results": {
            "foldoc": {
                "4bit": {
                    "train_rows": 100,
                    "test_rows": 32,
                    "max_length": 256,
                    "budget_cpu_seconds": 60,
                    "base_perplexity": 20.0,
                    "arms": {
                        "plain": arm([15, 12, 11, 10]),
                        "recipe": arm([16, 11, 9, 8])
                        | {
                            "settings": {
                                **quality.PLAIN,
                                "learning_rate": 5e-4,
                                "gradient_accumulation_steps": 1,
                                "packing": True,
                            }
                        },
                    },
                }
            }
        },
    }
    table = quality.markdown(payload)
    assert "| 15 | 15.00 (4) | 16.00 (4) | **no** |" in table and "| 60 | 10.00 (16) | 8.00 (16) | yes |" in table
    assert (
        "(b) as run: LoRA r=16, alpha 32, dropout 0.05, batch 4, lr 0.0005 cosine, warmup 0.0, gradient accumulation 1, packing on"
        in table
    )
    assert "Summary" not in table  # only with ablation arms
    payload["results"]["foldoc"]["4bit"]["arms"]["lr 1e-3"] = arm([14, 10, 8, 7]) | {
        "settings": {
            "lora_r": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.05,
            "batch_size": 4,
            "learning_rate": 1e-3,
            "warmup_ratio": 0.03,
            "gradient_accumulation_steps": 1,
        }
    }
    table = quality.markdown(payload)
    assert "| arm | settings | foldoc 4bit (not tuned on) |" in table
    assert (
        "| lr 1e-3 | LoRA r=16, alpha 32, dropout 0.05, batch 4, lr 0.001 cosine, warmup 0.03, gradient accumulation 1 | 7.00 (16) |"
        in table
    )


@pytest.fixture(scope="module")
def serve_load():
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = module
    spec.loader.exec_module(module)
    return module


def test_serve_load_summary_percentiles_and_targets(serve_load):
    records = [
        {"index": i, "text": "x", "finish": "stop", "latency_s": float(i + 1), "ttft_s": 0.1 * (i + 1)}
        for i in range(10)
    ]
    records.append({"index": 10, "error": "APIConnectionError:  refused", "latency_s": 0.5})
    summary = serve_load.summarize(records, 4.0, lambda record: 3)
    assert (summary["requests"], summary["errors"], summary["error_kinds"]) == (11, 1, ["APIConnectionError"])
    assert summary["tokens_per_s"] == 30 / 4 and summary["requests_per_s"] == 10 / 4
    # numpy's default percentile: linear between the closest ranks of the answered requests (1..10 s)
    assert summary["latency_p50_s"] == pytest.approx(5.5) and summary["latency_p95_s"] == pytest.approx(9.55)
    assert summary["ttft_p95_s"] == pytest.approx(0.955) and serve_load.percentile([], 0.5) is None
    levels = [
        {"server": "one_at_a_time", "callers": 1, "tokens_per_s": 30.0, "latency_p95_s": 2.0},
        {"server": "batched", "callers": 1, "tokens_per_s": 31.0, "latency_p95_s": 2.1},
        {"server": "one_at_a_time", "callers": 16, "tokens_per_s": 35.0, "latency_p95_s": 9.0},
        {"server": "batched", "callers": 16, "tokens_per_s": 140.0, "latency_p95_s": 3.0},
    ]
    goals = serve_load.goals(levels, {"errors": 0, "requests": 500})
    assert goals["throughput_ratio_16"] == 4 and goals["throughput_met"]
    assert goals["p95_ratio_1"] == pytest.approx(1.05) and not goals["p95_met"] and goals["soak_met"]
    assert not serve_load.goals(levels, {"errors": 0, "requests": 499})["soak_met"]


# ---------------------------------------------------------------- benchmarks/preference.py: pairs and scoring


@pytest.fixture(scope="module")
def preference():
    spec = importlib.util.spec_from_file_location("preference", ROOT / "benchmarks" / "preference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["preference"] = module
    spec.loader.exec_module(module)
    return module


def test_preference_scores_match_a_direct_computation(preference, tiny_llama_dir, chatml_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    pairs = [
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello there", "rejected": "go away, said at length"},
        {
            "prompt": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "and 3+3?"},
            ],
            "chosen": "6",
            "rejected": "7, I think",
        },
        {"prompt": [{"role": "user", "content": "name a colour"}], "chosen": "blue", "rejected": "red"},
    ]
    # by hand, one conversation at a time: transformers' own mean loss over the reply's tokens (end of turn included)
    logp, nll, tokens = {"chosen": [], "rejected": []}, 0.0, 0
    for pair in pairs:
        for side in ("chosen", "rejected"):
            full = chatml_tokenizer.apply_chat_template(
                [*pair["prompt"], {"role": "assistant", "content": pair[side]}], tokenize=False
            )
            prompt = chatml_tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
            prompt_ids = chatml_tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = prompt_ids + chatml_tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
            labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]
            with torch.no_grad():
                loss = float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss)
            logp[side].append(-loss)
            if side == "chosen":
                reply = len(ids) - len(prompt_ids)
                nll, tokens = nll + loss * reply, tokens + reply
    scores = preference.summary(preference.pair_rows(model, chatml_tokenizer, pairs, batch_size=2))
    margins = [c - r for c, r in zip(logp["chosen"], logp["rejected"])]
    assert scores["margin"] == pytest.approx(sum(margins) / 3, abs=1e-5)
    assert scores["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 3)
    assert scores["chosen_logp"] == pytest.approx(sum(logp["chosen"]) / 3, abs=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)


def test_preference_pairs_split_by_prompt_greedy_and_unpaired(preference, tiny_llama_dir, chatml_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    tasks = preference.quality_tasks
    chats = [tasks.exchange(f"question {i % 12}", f"answer {i}") for i in range(36)]
    chats.append(tasks.exchange("question 0", "answer 0"))  # an exact duplicate
    chats = preference.distinct(chats)
    assert len(chats) == 36
    train, test = preference.split_by_prompt(chats, test_prompts=3, seed=0)
    held = {c[0]["content"] for c in test}
    assert len(held) == 3 and len(test) == 9 and not held & {c[0]["content"] for c in train}
    assert preference.split_by_prompt(chats, test_prompts=3, seed=0) == (train, test)

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a much longer question, padded"}]]
    replies = preference.greedy_replies(model, chatml_tokenizer, prompts, max_new_tokens=5, batch_size=2)
    for prompt, reply in zip(prompts, replies):  # left padding changes nothing: each one alone, greedy
        ids = chatml_tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
        alone = model.generate(ids, do_sample=False, max_new_tokens=5, pad_token_id=chatml_tokenizer.pad_token_id)
        assert reply == chatml_tokenizer.decode(alone[0, ids.shape[1] :], skip_special_tokens=True).strip()

    generated = {preference.prompt_key(c[:-1]): "answer 1" if c[0]["content"] == "question 1" else "no" for c in chats}
    pairs = preference.greedy_pairs(chats, generated)
    assert len(pairs) == 35  # the pair whose real reply is the generated one is dropped
    assert {"prompt": chats[2][:-1], "chosen": "answer 2", "rejected": "no"} in pairs
    rows = preference.unpaired(pairs[:2])
    assert [r["label"] for r in rows] == [True, False, True, False]
    assert rows[1]["completion"] == [{"role": "assistant", "content": "no"}]


# ---------------------------------------------------------------- benchmarks/step_profile.py: families and table


@pytest.fixture(scope="module")
def step_profile():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("step_profile", ROOT / "benchmarks" / "step_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_operators_fall_into_families(step_profile):
    assert step_profile.family("aten::mm") == "matrix products"
    assert step_profile.family("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention (sdpa)"
    assert step_profile.family("aten::copy_") == "dtype casts and copies"
    assert step_profile.family("aten::random_") == "dropout masks"
    assert step_profile.family("bitsandbytes::dequantize_4bit") == "4-bit dequantization"
    assert step_profile.family("aten::something_new") == "other"


def test_profile_table_has_a_column_per_dtype_and_a_row_per_lever(step_profile):
    profile = {
        "families": {"matrix products": 0.6, "attention (sdpa)": 0.1},
        "self_cpu_s": 10.0,
        "wall_s_per_step_profiled": 2.0,
        "top_operators": [{"name": "aten::mm", "share": 0.6, "calls": 100}],
    }
    variant = {"mean_s_per_batch": 2.0, "median_ratio": 1.0, "iqr": [0.9, 1.1]}
    payload = {
        "machine": MACHINE,
        "quantization": "4bit",
        "warmup": 3,
        "profile_steps": 5,
        "command": "python benchmarks/step_profile.py",
        "profiles": {"float32": profile, "bfloat16": {**profile, "families": {"matrix products": 0.4}}},
        "levers": {
            "dtype": "bfloat16",
            "pairs": 48,
            "variants": {"as it is": variant, **{lever: variant for lever in step_profile.LEVERS}},
        },
    }
    table = step_profile.markdown(payload)
    assert "| matrix products | 60.0% | 40.0% |" in table and "| attention (sdpa) | 10.0% | 0.0% |" in table
    assert all(f"| {lever} | 2.000 | 1.000 | 0.900-1.100 |" in table for lever in step_profile.LEVERS)
