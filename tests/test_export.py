"""GGUF export, checked by the two programs that read the file: transformers and llama.cpp (llama-cpp-python).

The tiny model here is fully trained first until it answers the FACTS questions word for word and ends each reply
with <|im_end|>, so a correct export must make llama.cpp say exactly those answers and stop there."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from finetune import ChatSFTRecipe, FinetuneError, export
from finetune.cli import FLAGS, app
from finetune.llama_cpp_runner import PORTABLE_REBUILD, run_in_child
from tests.conftest import FACTS, build_chatml_tokenizer, tiny_recipe
from tests.families import FAMILIES, build_tokenizer
from tests.test_llama_cpp_runner import die_of

# Every check must pass with at least this much room: the measured deviation at most MARGIN / HEADROOM times what the
# format's rounding does in the same model (its rounding twin).
HEADROOM = 1.5


@pytest.fixture(scope="module")
def memorizing_llama_dir(facts_jsonl, tmp_path_factory):
    """A tiny Llama (grouped-query attention, untied output head) trained to recite the conversations of
    facts_jsonl, end-of-turn tokens included, so that its held-out replies are known word for word."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_chatml_tokenizer()
    tokenizer.pad_token = "<|endoftext|>"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.model.embed_tokens.weight.requires_grad_(False)  # random input embeddings serve; 6x faster without them
    chats = {json.dumps(json.loads(line)["messages"]) for line in facts_jsonl.read_text().splitlines()}
    batch = tokenizer(
        [tokenizer.apply_chat_template(json.loads(c), tokenize=False) for c in sorted(chats)],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    targets = batch.input_ids[:, 1:]
    keep = batch.attention_mask[:, 1:].bool()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(80):
        hidden = model.model(**batch).last_hidden_state[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            model.lm_head(hidden[keep]), targets[keep]
        )  # the head only where scored
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("memorizing-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run(memorizing_llama_dir, facts_jsonl, tmp_path_factory):
    config = tiny_recipe(
        memorizing_llama_dir, facts_jsonl, tmp_path_factory.mktemp("export") / "run", training__learning_rate=1e-4
    )
    config["evaluation"].update(before_and_after=False, generation=False)
    ChatSFTRecipe(**config).run()
    return ChatSFTRecipe.from_run_dir(config["output"]["dir"])


def _within_bounds_with_room(checks):
    for name in ("transformers_reload", "llama_cpp_logits"):
        if name in checks:
            check = checks[name]
            assert check["relative"] <= check["bound"], (name, check)
            assert check["relative"] <= export.MARGIN / HEADROOM * check["rounding_twin"] + export.ACCUMULATION_FLOOR, (
                name,
                check,
            )


def _export_folder(run):
    """Each file in export/ with its size and modification time."""
    folder = run.folder.export
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()) if folder.exists() else []


def _answers_recited(replies):
    known = {a for _, a in FACTS}
    return [reply.removesuffix("<|im_end|>") in known and reply.endswith("<|im_end|>") for reply in replies]


def test_f16_export_runs_in_llama_cpp_with_the_same_reply_and_stop(run):
    result = run.export(quant="f16")
    assert result.path == run.folder.export / "model-f16.gguf" and result.path.is_file()
    checks = result.checks
    _within_bounds_with_room(checks)
    assert checks["transformers_reload"]["bound"] < 0.2  # f16 rounding is small: a layout fault could not hide in it
    prompts = len(checks["llama_cpp_reply"]["replies"])
    assert prompts >= 2 and checks["transformers_reload"]["top1_agreement"] == f"{prompts}/{prompts}"
    reply = checks["llama_cpp_reply"]
    assert reply["stopped_at_end_of_turn"] == f"{prompts}/{prompts}" and reply["near_ties"] == 0
    assert all(_answers_recited(reply["replies"])), reply["replies"]  # llama.cpp recites what the model learnt
    recorded = json.loads(run.folder.export_record.read_text())
    assert recorded["model-f16.gguf"]["checks"]["llama_cpp_reply"]["replies"] == reply["replies"]
    modelfile = run.folder.modelfile.read_text()
    assert modelfile.startswith("FROM ./model-f16.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "SYSTEM" not in modelfile  # the recipe has no data.system_prompt
    assert not list(run.folder.path.glob(".export-*"))  # the staging folder is gone


def test_metadata_carries_tokenizer_template_and_turn_ids(run):
    import gguf

    run.export(quant="f16") if not (run.folder.export / "model-f16.gguf").is_file() else None
    reader = gguf.GGUFReader(run.folder.export / "model-f16.gguf")
    fields = {
        name: field.contents()
        for name, field in reader.fields.items()
        if not name.startswith("tokenizer.ggml.") or "id" in name or name.endswith(("model", "pre", "add_bos_token"))
    }
    tokenizer = run.tokenizer
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (
        fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
        and fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    )
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert "output.weight" in {t.name for t in reader.tensors}  # this model's head is not tied


def test_q8_0_through_the_cli(run):
    result = CliRunner().invoke(app, ["export", str(run.folder.path), "--quant", "q8_0"])
    assert result.exit_code == 0, result.output
    recorded = json.loads(run.folder.export_record.read_text())["model-q8_0.gguf"]
    _within_bounds_with_room(recorded["checks"])
    assert all(_answers_recited(recorded["checks"]["llama_cpp_reply"]["replies"]))
    sizes = {name: entry["size_bytes"] for name, entry in json.loads(run.folder.export_record.read_text()).items()}
    assert sizes["model-q8_0.gguf"] < 0.7 * sizes.get("model-f16.gguf", float("inf"))
    assert run.folder.modelfile.read_text().startswith("FROM ./model-q8_0.gguf\n")  # the newest export


def test_adapter_only_applies_in_llama_cpp_over_its_base(run):
    result = run.export(quant="f16", adapter_only=True)
    assert result.path == run.folder.export / "adapter.gguf" and result.base == run.folder.export / "base-f16.gguf"
    assert result.base.is_file()  # the base was a transformers folder, so its GGUF is written beside the adapter
    assert result.checks["llama_cpp_reply"]["stopped_at_end_of_turn"] == "2/2"
    _within_bounds_with_room(result.checks)
    assert all(_answers_recited(result.checks["llama_cpp_reply"]["replies"]))
    modelfile = run.folder.modelfile.read_text()
    assert modelfile.startswith("FROM ./base-f16.gguf\nADAPTER ./adapter.gguf\n")


def test_q4_k_m_from_llama_cpps_quantizer_through_the_cli(run):
    result = CliRunner().invoke(app, ["export", str(run.folder.path), "--quant", "q4_k_m"])
    assert result.exit_code == 0, result.output
    recorded = json.loads(run.folder.export_record.read_text())["model-q4_k_m.gguf"]
    _within_bounds_with_room(recorded["checks"])
    assert all(_answers_recited(recorded["checks"]["llama_cpp_reply"]["replies"]))
    assert not list(run.folder.path.rglob("*source-f32*"))  # the float32 file llama.cpp quantized from is gone


def test_llama_cpp_python_server_answers_the_openai_client(run, tmp_path):
    """The recipe in docs/deployment.md: `python -m llama_cpp.server` (llama-cpp-python's OpenAI-compatible server,
    its [server] dependencies pinned in the export and dev extras) on the exported GGUF, asked by the openai client,
    recites what the model learnt and stops at the end-of-turn token, plain and streamed."""
    import openai

    gguf = run.folder.export / "model-f16.gguf"
    if not gguf.is_file():
        run.export(quant="f16")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "facts"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512"]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "llama_cpp.server did not answer within 60 s"
            try:
                assert [model.id for model in api.models.list()] == ["facts"]
                break
            except openai.APIConnectionError:
                time.sleep(0.2)
        # llama-cpp-python's server applies repeat_penalty 1.1 unless told otherwise: 1.0 is plain greedy decoding.
        plain = {"temperature": 0, "max_tokens": 32, "extra_body": {"repeat_penalty": 1.0}}
        for question, answer in FACTS[:3]:
            messages = [{"role": "user", "content": question}]
            reply = api.chat.completions.create(model="facts", messages=messages, **plain)
            assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (answer, "stop")
        chunks = list(api.chat.completions.create(model="facts", messages=messages, stream=True, **plain))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer
        assert chunks[-1].choices[0].finish_reason == "stop"
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_a_failed_check_leaves_no_file_and_says_which_check(run, monkeypatch, quant):
    """Rows of q/k left in Hugging Face's rotary layout (the classic conversion bug) must not survive the checks:
    the bound follows the format's rounding, and a layout fault is far larger than rounding."""
    monkeypatch.setattr(export, "_permute", lambda weight, heads: weight)
    before = _export_folder(run)
    with pytest.raises(FinetuneError, match=r"GGUF export check `\w+` failed: .* differ .* by up to"):
        run.export(quant=quant)
    assert _export_folder(run) == before  # an earlier good export of this type is kept as it was
    assert not list(run.folder.path.glob(".export-*"))


def test_llama_cpp_dying_mid_export_is_one_error_and_leaves_nothing(run, monkeypatch):
    """llama.cpp runs in a child: when it dies of SIGILL (as a -march=native build does on a CPU without AMX), the
    export raises one FinetuneError with the cause and the fix, this process lives on, and no file is left."""

    def inspect_and_die(*args, **kwargs):
        return run_in_child(die_of, "SIGILL", what=kwargs["what"])

    monkeypatch.setattr(export, "inspect_gguf", inspect_and_die)
    before = _export_folder(run)
    with pytest.raises(FinetuneError) as error:
        run.export(quant="q8_0")
    assert "died of SIGILL" in str(error.value) and PORTABLE_REBUILD in str(error.value)
    assert _export_folder(run) == before
    assert not list(run.folder.path.glob(".export-*"))


def test_unknown_quant_and_unsupported_architecture_get_clear_errors(run, tiny_gpt2_dir):
    with pytest.raises(FinetuneError) as error:
        run.export(quant="q3_k")
    assert "quant='q3_k'" in str(error.value) and "q4_k_m" in str(error.value)
    assert "--quant q3_k" in error.value.render(FLAGS)
    cli = CliRunner().invoke(app, ["export", str(run.folder.path), "--quant", "q3_k"])
    assert cli.exit_code == 2 and "q3_k" in cli.output
    from transformers import AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    with pytest.raises(FinetuneError, match="Llama architecture .* this model is GPT2LMHeadModel"):
        export.write_model_gguf(run.folder.path / "x.gguf", gpt2, run.tokenizer, run.stop_ids, "f16", name="x")
    assert not (run.folder.path / "x.gguf").exists()


@pytest.mark.parametrize(
    "family", [FAMILIES[name] for name in ("llama", "qwen2", "gemma2", "gpt2")], ids=lambda f: f.name
)
def test_modelfile_template_renders_what_the_chat_template_renders(family):
    tokenizer = build_tokenizer(family)
    stop = [tokenizer.convert_tokens_to_ids(family.end_of_turn)]
    text, warning = export.modelfile_text(tokenizer, stop, "./model.gguf")
    pieces = export.chat_template_pieces(tokenizer)
    if family.name in ("llama", "gpt2"):  # turns are fixed text around each message: translated, and checked on probes
        assert warning is None and "TEMPLATE" in text
        messages = [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"},
            {"role": "user", "content": "V"},
        ]
        assert export.render_pieces(pieces, messages) == tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    else:  # Qwen2.5 adds a default system prompt, Gemma folds the system prompt into the first user turn
        assert pieces is None and "TEMPLATE" not in text and "no TEMPLATE" in warning


@pytest.mark.parametrize("seed", [1, 2])
def test_bounds_hold_with_margin_over_seeds_and_types(seed, tmp_path):
    """Random tiny models (the head tied for odd seeds) in three formats: every deviation is well inside the bound
    derived from the format's rounding. (The trained model of the tests above and SmolLM2-135M in test_smollm2.py
    are checked the same way; benchmarks/results/export_quality.md lists the ratios for every type on SmolLM2.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_chatml_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=seed % 2 == 1,
    )
    model = LlamaForCausalLM(config).eval()
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q, _ in FACTS[:3]
    ]
    # The export's own steps (write, read back, both checks) without a run folder around them.
    probe = export._Probe(
        tokenizer=tokenizer,
        prompts=prompts,
        ids=[tokenizer(p, add_special_tokens=False).input_ids for p in prompts],
        stop_ids=[tokenizer.convert_tokens_to_ids("<|im_end|>")],
        max_new_tokens=4,
    )
    for quant in ("f16", "q8_0", "q4_k_m"):
        path = tmp_path / f"model-{quant}.gguf"
        export._write_as(path, model, probe, quant=quant, staging=tmp_path, name="tiny")
        stored = export._stored_tensors(path)
        on_file = export._load_gguf(path)
        checks = {"transformers_reload": export._reload_check(on_file, model, stored, probe)}
        checks.update(export._llama_cpp_checks(path, lora=None, reference=on_file, stored=stored, probe=probe))
        _within_bounds_with_room(checks)
