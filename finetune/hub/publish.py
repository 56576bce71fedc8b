"""Publishing: `push(run_dir, repo_id)` uploads a run's adapter (or merged model) with its card and manifest through
huggingface_hub, then tags the commit with the run name; a dry run lists what would be sent and contacts nothing."""

from __future__ import annotations

import glob
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

# huggingface_hub 2.x talks HTTP through httpx2; its TransportError is how a refused or dropped connection arrives.
import httpx2
from huggingface_hub import HfApi, constants, get_token, is_offline_mode
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects, validate_repo_id

from finetune import __version__
from finetune.errors import FinetuneError, argument
from finetune.hub.card import write_model_card
from finetune.hub.manifest import write_manifest
from finetune.run_folder import MANIFEST, RunFolder

# Status codes worth another try: rate limits and server-side hiccups.
_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)

T = TypeVar("T")


@dataclass
class PushReport:
    """What a push sends (a dry run stops here) and, after a real push, where it landed."""

    repo_id: str
    endpoint: str
    folder: Path
    files: list[tuple[str, int]]  # path in the repo, size in bytes
    branch: str
    tag: str
    private: bool
    dry_run: bool
    commit_url: str | None = None
    tag_existed: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def lines(self) -> list[str]:
        """What `finetune push` prints: the repository, branch, tag and files, and after a real push the commit's URL.

        Returns:
            The lines to print.
        """
        visibility = "private" if self.private else "the Hub's default visibility"
        head = "Dry run, nothing sent. Would upload" if self.dry_run else "Uploaded"
        lines = [
            f"{head} {len(self.files)} files ({_size(self.total_bytes)}) from {self.folder} to {self.endpoint}/{self.repo_id} "
            f"(branch {self.branch}, tag {self.tag}, {visibility}):"
        ]
        width = max((len(path) for path, _ in self.files), default=0)
        lines += [f"  {path:<{width}}  {_size(size):>9}" for path, size in self.files]
        if self.commit_url:
            lines.append(f"Commit: {self.commit_url}")
        if self.tag_existed:
            lines.append(f"Tag {self.tag} already existed and was left where it was; delete it on the Hub to move it.")
        return lines


def push(
    run_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    merged: bool = False,
    dry_run: bool = False,
    revision: str | None = None,
    attempts: int = 3,
    retry_wait: float = 2.0,
) -> PushReport:
    """Publish a run's adapter (or, with `merged`, its merged model) with model card and manifest to the Hub.

    Creates `repo_id` if needed, commits the folder to `revision` (a branch, created from main if missing; default
    main) and tags the commit with the run name (`NAME-merged` for the merged model). The token comes from HF_TOKEN
    or the login cache (`hf auth login`) and is never printed or written. A run without `run.json` gets its card and
    manifest first. `dry_run` lists exactly what would be uploaded and contacts nothing. Network failures and
    5xx/429 answers are retried `attempts` times, waiting `retry_wait` seconds and doubling.

    Raises:
        FinetuneError: not a run folder, bad repo id, no token, offline mode, or the Hub refused or stayed unreachable.

    Args:
        run_dir: A finished run folder.
        repo_id: The Hub repository, "user/name" or "org/name".
        private: Whether a repository created here is private.
        merged: Whether to push merged/ instead of adapter/.
        dry_run: Whether to only list what would be uploaded.
        revision: The branch to commit to; None for main.
        attempts: Tries per Hub call before giving up.
        retry_wait: Seconds before the first retry; each further wait doubles.

    Returns:
        The PushReport: what was (or would be) sent and where it landed.
    """
    run = RunFolder(Path(run_dir))
    _check_repo_id(repo_id)
    folder = run.merged if merged else run.adapter
    if not folder.is_dir():
        fix = (
            f"Push the adapter (without {argument('merged')}), or run with output.merge: true."
            if merged
            else "Pass a folder made by `finetune run`."
        )
        raise FinetuneError(f"{run.path}: no {folder.name}/ folder to push. {fix}")
    if not (folder / MANIFEST).is_file():
        write_model_card(run.path)
        write_manifest(run.path)
    config = run.read_config()
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    paths = list(filter_repo_objects(paths, ignore_patterns=DEFAULT_IGNORE_PATTERNS))
    report = PushReport(
        repo_id=repo_id,
        endpoint=constants.ENDPOINT,
        folder=folder,
        files=[(path, (folder / path).stat().st_size) for path in paths],
        branch=revision or "main",
        tag=f"{config.name}-merged" if merged else config.name,
        private=private,
        dry_run=dry_run,
    )
    if dry_run:
        return report
    if is_offline_mode():
        raise FinetuneError(
            f"HF_HUB_OFFLINE is set, so nothing can be pushed. Unset it (or set HF_HUB_OFFLINE=0), or pass {argument('dry_run')}."
        )
    token = get_token()
    if not token:
        raise FinetuneError(
            "no Hugging Face token found. Create a token with write access at https://huggingface.co/settings/tokens, "
            "then set HF_TOKEN=... or run `hf auth login`."
        )
    api = HfApi(token=token, library_name="finetune", library_version=__version__)

    def step(what: str, action: Callable[[], T]) -> T:
        return _with_retries(what, action, report=report, token=token, attempts=attempts, retry_wait=retry_wait)

    # Without `private`, an existing repo keeps its visibility and a new one gets the namespace's default.
    step("create the repository", lambda: api.create_repo(repo_id, private=True if private else None, exist_ok=True))
    if report.branch != "main":
        step(f"create branch {report.branch}", lambda: api.create_branch(repo_id, branch=report.branch, exist_ok=True))
    commit = step(
        "upload the files",
        lambda: api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=report.branch,
            # The dry run's list, escaped so names are matched literally: what was listed is what is sent.
            allow_patterns=[glob.escape(path) for path in paths],
            commit_message=f"finetune run {config.name} ({folder.name}/)",
        ),
    )
    report.commit_url = commit.commit_url
    report.tag_existed = step("tag the commit", lambda: _create_tag(api, repo_id, report.tag, commit.oid, config.name))
    return report


def _create_tag(api: HfApi, repo_id: str, tag: str, commit: str, name: str) -> bool:
    """Tag the commit; True when the tag already existed (a re-push of the same run), which is left as it was."""
    try:
        api.create_tag(repo_id, tag=tag, revision=commit, tag_message=f"finetune run {name}")
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code == 409:
            return True
        raise
    return False


def _check_repo_id(repo_id: str) -> None:
    problem = None if repo_id.count("/") == 1 else "it must be owner/name"
    if problem is None:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            problem = str(exc).split("\n")[0]
    if problem:
        raise FinetuneError(
            f"{argument('repo_id', repo_id)}: {problem}. Example: {argument('repo_id', 'alice/smollm2-chat')}."
        )


def _with_retries(
    what: str, action: Callable[[], T], *, report: PushReport, token: str, attempts: int, retry_wait: float
) -> T:
    started, attempt = time.monotonic(), 1
    while True:
        try:
            return action()
        # huggingface_hub reads some answers (validate-yaml) as JSON before checking the status, so an HTML error
        # page from a proxy arrives as a JSONDecodeError.
        except (httpx2.HTTPError, json.JSONDecodeError) as exc:
            if not _transient(exc) or attempt >= attempts:
                message = _explain(exc, what, report, attempt, time.monotonic() - started)
                # No cause chained: the Hub client's own exception may quote the token.
                raise FinetuneError(message.replace(token, "<token>")) from None
        time.sleep(retry_wait * 2 ** (attempt - 1))
        attempt += 1


def _transient(exc: Exception) -> bool:
    if isinstance(exc, HfHubHTTPError):
        return exc.response is not None and exc.response.status_code in _TRANSIENT_STATUS
    return isinstance(exc, (httpx2.TransportError, json.JSONDecodeError))


def _explain(exc: Exception, what: str, report: PushReport, tries: int, seconds: float) -> str:
    where = f"{report.endpoint}/{report.repo_id}"
    status = exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else None
    if status == 401:
        return (
            f"the Hub rejected the token (401) while trying to {what} on {where}. Create a token with write access at "
            "https://huggingface.co/settings/tokens, then set HF_TOKEN=... or run `hf auth login`."
        )
    if status == 403:
        owner = report.repo_id.split("/")[0]
        return (
            f"the token may not write to {report.repo_id} (403) while trying to {what}. Use a token with write access "
            f"to the `{owner}` namespace, or push to a repository you own."
        )
    if _transient(exc):
        if status:
            reason = f"HTTP {status}"
        elif isinstance(exc, json.JSONDecodeError):
            reason = "the answer was not JSON (an error page from a proxy or the Hub)"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        return (
            f"could not {what} on {where}: {reason}, {tries} tries over {seconds:.0f} s. The Hub or the network is "
            "unavailable; check the connection (and https://status.huggingface.co), then run the same push again."
        )
    server = getattr(exc, "server_message", None) or str(exc).split("\n")[0]
    return f"the Hub answered {status} while trying to {what} on {where}: {server}"


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("kB", "MB", "GB"):  # noqa: B007 - the unit the loop stops at is the one printed
        value /= 1000
        if value < 1000:
            break
    return f"{value:.1f} {unit}"
