"""Serving under load: `finetune serve` before continuous batching (one generation at a time) and with it, driven by
the official `openai` client from 1, 4, 16 and 32 concurrent callers, in one session.

    .venv/bin/python benchmarks/serve_load.py        # SmolLM2-135M-Instruct, greedy, max_tokens 64, ~15 minutes

Both servers run as `python -m finetune serve MODEL` subprocesses on 127.0.0.1: the one-at-a-time server from
`--baseline-ref` (the last commit before batching, checked out with `git archive` into a temporary folder), the
batched one from this checkout. For each number of callers, the baseline's level runs and then the batched one's, so
both see the machine in the same state; the load average is recorded around each. Every caller streams its requests
(so time to first token is seen) one after another until the level's count is reached. Then the batched server takes
`--soak` requests from 32 callers, streamed and not, of mixed lengths, counting errors. Generated tokens are the
replies re-tokenized (plus the end-of-turn token when the reply stopped), the same count for both servers.
Results: benchmarks/results/serve_load.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import OFFLINE, machine, machine_markdown, write  # noqa: E402

os.environ.update({k: os.environ.get(k, v) for k, v in OFFLINE.items()})
ROOT = Path(__file__).resolve().parents[1]
# The last commit whose server generated one request at a time (a single worker thread over model.generate()).
ONE_AT_A_TIME_REF = "4b4ab8835b49a9448c0556c6c4e6abea11341dd6"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "How do I boil an egg?",
    "Tell me a joke about computers.",
    "What is Python used for?",
    "Explain gravity to a child.",
    "Name three fruits that are red.",
    "Why is the sky blue?",
    "Give me a tip for sleeping better.",
    "What is the difference between a virus and a bacterium?",
    "How many legs does a spider have?",
    "Suggest a name for a black cat.",
    "What should I pack for a weekend hike?",
    "Summarise the plot of Romeo and Juliet.",
    "What is a prime number?",
    "How do plants make food?",
    "Translate 'good morning' into Spanish.",
    "What are your interests?",
    "Recommend a book for a long flight.",
    "How do I make a cup of tea?",
    "What is the tallest mountain in the world?",
    "Why do cats purr?",
    "Write one sentence about the ocean.",
    "What is machine learning?",
    "How can I learn to play the guitar?",
    "What causes thunder?",
    "Describe a sunset in two sentences.",
    "What is the boiling point of water?",
    "How do airplanes stay in the air?",
    "What is your favourite colour?",
    "Give me three ideas for dinner.",
    "What does a librarian do?",
]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Bundled alias, run folder or model folder.")
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 4, 16, 32], help="Concurrent callers per level.")
    parser.add_argument(
        "--requests", type=int, nargs="+", default=[16, 16, 48, 64], help="Requests per level (one per --callers)."
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=16, help="The batched server's --max-batch-size.")
    parser.add_argument("--soak", type=int, default=500, help="Requests to the batched server at --soak-callers.")
    parser.add_argument("--soak-callers", type=int, default=32)
    parser.add_argument("--baseline-ref", default=ONE_AT_A_TIME_REF, help="Commit of the one-at-a-time server.")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of both servers (default: torch's own, one per core). On a machine shared with other "
        "jobs, 1: two threads that the scheduler preempts wait for each other at every operation.",
    )
    parser.add_argument("--level-timeout", type=float, default=900, help="Seconds one level may take in all.")
    parser.add_argument("--name", default="serve_load", help="Results file name under benchmarks/results/.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if len(args.requests) != len(args.callers):
        parser.error("give one --requests count per --callers level")
    return args


# ------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`python -m finetune serve` from `source` (a folder holding a `finetune` package) on a free loopback port."""

    def __init__(
        self, label: str, source: Path, model: str, options: list[str], log: Path, threads: int | None = None
    ) -> None:
        self.label, self.port, self.log = label, free_port(), log
        env = {**os.environ, "PYTHONPATH": str(source)}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        command = [sys.executable, "-m", "finetune", "serve", model, "--port", str(self.port), *options]
        self.process = subprocess.Popen(command, cwd=source, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, seconds: float = 300) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} server exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"{self.label} server did not answer /health within {seconds} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def baseline_source(ref: str, folder: Path) -> Path:
    """The `finetune` package as it was at `ref`, extracted (not checked out) into `folder`."""
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref, "finetune"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


# ------------------------------------------------------------------------------------------- load


async def drive(
    url: str,
    callers: int,
    requests: int,
    max_tokens: int,
    *,
    model: str,
    deadline_s: float,
    mixed: bool = False,
) -> tuple[list[dict[str, Any]], float]:
    """`requests` chat completions from `callers` concurrent callers, each sending its next request when its last
    one is answered. Returns each request's record and the wall time from the first request to the last answer.
    `mixed`: every other request is not streamed, and max_tokens cycles through a quarter, half, ... of max_tokens."""
    import openai

    api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
    pending = iter(range(requests))
    records: list[dict[str, Any]] = []

    async def one(index: int) -> dict[str, Any]:
        stream = not (mixed and index % 2)
        tokens = max_tokens * (1 + index % 4) // 4 if mixed else max_tokens
        record: dict[str, Any] = {
            "index": index,
            "prompt": index % len(PROMPTS),
            "stream": stream,
            "max_tokens": tokens,
        }
        messages = [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]
        start = time.perf_counter()
        try:
            response = await api.chat.completions.create(
                model=model, messages=messages, max_tokens=tokens, temperature=0, stream=stream
            )
            if stream:
                text, finish = [], None
                async for chunk in response:
                    piece = chunk.choices[0].delta.content if chunk.choices else None
                    if piece and "ttft_s" not in record:
                        record["ttft_s"] = time.perf_counter() - start
                    text.append(piece or "")
                    finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
                record.update(text="".join(text), finish=finish)
            else:
                record.update(text=response.choices[0].message.content or "", finish=response.choices[0].finish_reason)
        except Exception as exc:  # counted, never fatal: a benchmark of robustness must see every failure
            record["error"] = f"{type(exc).__name__}: {getattr(exc, 'status_code', '')} {str(exc)[:200]}"
        record["latency_s"] = time.perf_counter() - start
        return record

    async def caller() -> None:
        for index in pending:
            records.append(await one(index))

    started = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*[caller() for _ in range(callers)]), timeout=deadline_s)
    except asyncio.TimeoutError:
        done = {record["index"] for record in records}
        records += [
            {"index": i, "error": "level timeout", "latency_s": deadline_s} for i in range(requests) if i not in done
        ]
    wall = time.perf_counter() - started
    await api.close()
    return sorted(records, key=lambda record: record["index"]), wall


def percentile(values: list[float], share: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * share
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(records: list[dict[str, Any]], wall: float, count_tokens) -> dict[str, Any]:
    """Throughput and latency of one level: generated tokens and answered requests per second of wall time, p50/p95
    latency and time to first token of the answered requests, and the errors."""
    answered = [record for record in records if "error" not in record]
    tokens = sum(count_tokens(record) for record in answered)
    latencies = [record["latency_s"] for record in answered]
    ttfts = [record["ttft_s"] for record in answered if "ttft_s" in record]
    return {
        "requests": len(records),
        "errors": len(records) - len(answered),
        "error_kinds": sorted({record["error"].split(":")[0] for record in records if "error" in record}),
        "generated_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "requests_per_s": len(answered) / wall if wall else 0.0,
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p95_s": percentile(latencies, 0.95),
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p95_s": percentile(ttfts, 0.95),
    }


def main() -> None:
    args = arguments()
    from finetune import models
    from finetune.config import ModelConfig

    tokenizer = models.load_tokenizer(ModelConfig(source=args.model))

    def count_tokens(record: dict[str, Any]) -> int:
        return len(tokenizer(record["text"], add_special_tokens=False)["input_ids"]) + (record["finish"] == "stop")

    info = machine()
    work = Path(tempfile.mkdtemp(prefix="serve_load-"))
    old = baseline_source(args.baseline_ref, work / "baseline")
    common = ["--max-tokens", str(args.max_tokens)]
    servers = {
        "one_at_a_time": Server("one_at_a_time", old, args.model, common, work / "one_at_a_time.log", args.threads),
        "batched": Server(
            "batched",
            ROOT,
            args.model,
            [*common, "--max-batch-size", str(args.max_batch_size)],
            work / "batched.log",
            args.threads,
        ),
    }
    try:
        for server in servers.values():
            server.wait_ready()
        model_name = _model_name(servers["batched"].url)
        for server in servers.values():  # a first request pays one-off costs (kernels, allocator) outside the levels
            asyncio.run(drive(server.url, 1, 2, 8, model=model_name, deadline_s=120))
        levels: list[dict[str, Any]] = []
        replies: dict[str, dict[int, str]] = {label: {} for label in servers}
        for callers, requests in zip(args.callers, args.requests):
            for label, server in servers.items():
                load_before = os.getloadavg()[0]
                records, wall = asyncio.run(
                    drive(
                        server.url,
                        callers,
                        requests,
                        args.max_tokens,
                        model=model_name,
                        deadline_s=args.level_timeout,
                    )
                )
                summary = summarize(records, wall, count_tokens)
                summary.update(
                    server=label,
                    callers=callers,
                    load_before=round(load_before, 2),
                    load_after=round(os.getloadavg()[0], 2),
                )
                levels.append(summary)
                for record in records:
                    if "error" not in record:
                        replies[label].setdefault(record["prompt"], record["text"])
                print(
                    f"{label:>13} x{callers:<3} {summary['tokens_per_s']:6.1f} tok/s  p95 {summary['latency_p95_s']:.2f} s"
                    f"  errors {summary['errors']}  load {load_before:.2f}",
                    flush=True,
                )
        soak = None
        if args.soak:
            load_before = os.getloadavg()[0]
            records, wall = asyncio.run(
                drive(
                    servers["batched"].url,
                    args.soak_callers,
                    args.soak,
                    args.max_tokens,
                    model=model_name,
                    deadline_s=args.level_timeout,
                    mixed=True,
                )
            )
            soak = summarize(records, wall, count_tokens)
            soak.update(
                callers=args.soak_callers,
                load_before=round(load_before, 2),
                load_after=round(os.getloadavg()[0], 2),
                errors_listed=[record["error"] for record in records if "error" in record][:20],
            )
            print(f"soak: {soak['requests']} requests, {soak['errors']} errors, {soak['tokens_per_s']:.1f} tok/s")
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    shared = sorted(set(replies["one_at_a_time"]) & set(replies["batched"]))
    identical = sum(replies["one_at_a_time"][p] == replies["batched"][p] for p in shared)
    payload = {
        "machine": info,
        "command": " ".join(["python benchmarks/serve_load.py", *sys.argv[1:]]),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "levels": levels,
        "soak": soak,
        "identical_replies": {"prompts": len(shared), "identical": identical},
        "goals": goals(levels, soak),
    }
    json_path, md_path = write(args.name, payload, markdown(payload), args.out)
    png = plot(levels, args.out / f"{args.name}.png")
    print(md_path.read_text())
    print(f"written: {json_path}, {md_path}, {png}")


def _model_name(url: str) -> str:
    import json

    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as response:
        return json.load(response)["data"][0]["id"]


def goals(levels: list[dict[str, Any]], soak: dict[str, Any] | None) -> dict[str, Any]:
    """The issue's targets: at least 4x the one-at-a-time throughput at 16 callers, p95 latency no worse at 1 caller,
    0 errors over the soak's requests."""
    by = {(level["server"], level["callers"]): level for level in levels}
    result: dict[str, Any] = {}
    if ("batched", 16) in by and ("one_at_a_time", 16) in by:
        ratio = by[("batched", 16)]["tokens_per_s"] / by[("one_at_a_time", 16)]["tokens_per_s"]
        result["throughput_ratio_16"] = ratio
        result["throughput_met"] = ratio >= 4
    if ("batched", 1) in by and ("one_at_a_time", 1) in by:
        ratio = by[("batched", 1)]["latency_p95_s"] / by[("one_at_a_time", 1)]["latency_p95_s"]
        result["p95_ratio_1"] = ratio
        result["p95_met"] = ratio <= 1
    if soak is not None:
        result["soak_errors"] = soak["errors"]
        result["soak_met"] = soak["errors"] == 0 and soak["requests"] >= 500
    return result


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(payload: dict[str, Any]) -> str:
    settings, levels, soak, goal = payload["settings"], payload["levels"], payload["soak"], payload["goals"]
    base = {level["callers"]: level for level in levels if level["server"] == "one_at_a_time"}
    lines = [
        "# Serving under load: continuous batching vs one generation at a time",
        "",
        machine_markdown(payload["machine"]),
        "",
        f"`finetune serve {settings['model']}`, greedy, max_tokens {settings['max_tokens']}, the official `openai` client "
        f"streaming from N concurrent callers over 127.0.0.1; the batched server with --max-batch-size "
        f"{settings['max_batch_size']}, the one-at-a-time server from commit {settings['baseline_ref'][:7]}, each level "
        f"run on both back to back; server threads: {'torch default' if settings['threads'] == 'None' else settings['threads']}. "
        f"Command: `{payload['command']}`.",
        "",
        "| callers | server | requests | errors | tokens/s | vs one at a time | requests/s | p50 latency (s) | p95 latency (s) "
        "| p50 first token (s) | p95 first token (s) | load average before/after |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for level in levels:
        ratio = level["tokens_per_s"] / base[level["callers"]]["tokens_per_s"] if level["callers"] in base else None
        lines.append(
            f"| {level['callers']} | {level['server'].replace('_', ' ')} | {level['requests']} | {level['errors']} "
            f"| {level['tokens_per_s']:.1f} | {'-' if ratio is None else f'{ratio:.2f}x'} | {level['requests_per_s']:.2f} "
            f"| {_s(level['latency_p50_s'])} | {_s(level['latency_p95_s'])} | {_s(level['ttft_p50_s'])} "
            f"| {_s(level['ttft_p95_s'])} | {level['load_before']} / {level['load_after']} |"
        )
    same = payload["identical_replies"]
    lines += ["", f"Identical replies from both servers: {same['identical']} of {same['prompts']} prompts."]
    if soak:
        lines += [
            "",
            f"Soak, batched server: {soak['requests']} requests from {soak['callers']} callers (every other one streamed, "
            f"max_tokens cycling through 1/4 to 4/4 of {settings['max_tokens']}): {soak['errors']} errors, "
            f"{soak['tokens_per_s']:.1f} tokens/s, {soak['requests_per_s']:.2f} requests/s, p50 latency "
            f"{_s(soak['latency_p50_s'])} s, p95 {_s(soak['latency_p95_s'])} s; load average {soak['load_before']} / "
            f"{soak['load_after']}.",
        ]
    lines += ["", "Targets:"]
    if "throughput_ratio_16" in goal:
        lines.append(
            f"- throughput at 16 callers at least 4x one at a time: {goal['throughput_ratio_16']:.2f}x, "
            + ("met." if goal["throughput_met"] else "NOT met.")
        )
    if "p95_ratio_1" in goal:
        lines.append(
            f"- p95 latency at 1 caller no worse: {goal['p95_ratio_1']:.2f}x one at a time's, "
            + ("met." if goal["p95_met"] else "NOT met.")
        )
    if "soak_met" in goal:
        lines.append(
            f"- 0 errors over 500 requests: {goal['soak_errors']} errors, "
            + ("met." if goal["soak_met"] else "NOT met.")
        )
    return "\n".join(lines) + "\n"


def plot(levels: list[dict[str, Any]], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    throughput, latency = figure.subplots(1, 2)
    for label, colour in (("one_at_a_time", "tab:gray"), ("batched", "tab:blue")):
        mine = [level for level in levels if level["server"] == label]
        callers = [level["callers"] for level in mine]
        throughput.plot(
            callers, [level["tokens_per_s"] for level in mine], "o-", color=colour, label=label.replace("_", " ")
        )
        latency.plot(
            callers, [level["latency_p95_s"] for level in mine], "o-", color=colour, label=label.replace("_", " ")
        )
    callers = sorted({level["callers"] for level in levels})
    for axes, title in ((throughput, "generated tokens/s"), (latency, "p95 latency (s)")):
        axes.set_xscale("log", base=2)
        axes.set_xticks(callers, [str(count) for count in callers])
        axes.set_ylim(bottom=0)
        axes.set_xlabel("concurrent callers")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return path


if __name__ == "__main__":
    main()
