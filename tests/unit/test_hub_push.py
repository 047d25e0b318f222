"""`omni export --push-to-hub` against a LOCAL HTTP SERVER THAT STANDS IN FOR THE HUGGING FACE HUB.

Nothing here talks to the real Hub. `FakeHub` (stdlib http.server in a thread, on 127.0.0.1) implements just the
endpoints huggingface_hub 2.x calls for `create_repo` + `upload_folder` with files it is told to send as regular
(non-LFS, non-xet) blobs: POST /api/repos/create, POST /api/validate-yaml (the README's front matter),
POST /api/models/{repo}/preupload/{rev} (answers "regular" for every file) and POST /api/models/{repo}/commit/{rev}
(an NDJSON commit with base64 file contents). It records every
request. HF_ENDPOINT points huggingface_hub at it; HF_TOKEN holds a canary string that must reach the server only
in the Authorization header, and appear in no output, log or file.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CANARY = "hf_CANARY_do_not_leak_7f3a9c2e51"
REPO_ID = "someone/tiny-omni"


class FakeHub(ThreadingHTTPServer):
    """Records requests; keeps the files committed per repo."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.forbidden = {"someone/forbidden"}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeHub

    def log_message(self, *args):  # keep the test output quiet
        pass

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self) -> bytes:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.server.requests.append({"method": self.command, "path": self.path, "headers": headers, "body": body})
        return body

    def do_GET(self):
        self._record()
        self._reply(404, {"error": "Repository not found"})

    def do_POST(self):
        body = self._record()
        path = self.path.split("?")[0]
        parts = path.strip("/").split("/")
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}"
            if repo in self.server.forbidden:
                return self._reply(403, {"error": "You don't have the rights to create a model under this namespace"})
            self.server.repos[repo] = payload
            return self._reply(200, {"url": f"{self.server.url}/{repo}", "name": repo, "id": repo})
        if path == "/api/validate-yaml":  # upload_folder has a README.md's front matter checked first
            content = json.loads(body)["content"]
            ok = content.startswith("---\n") and isinstance(yaml.safe_load(content.split("---\n")[1]), dict)
            return self._reply(200 if ok else 400, {} if ok else {"error": "invalid model card metadata"})
        if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
            repo = f"{parts[2]}/{parts[3]}"
            stored = self.server.files.setdefault(repo, {})
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    stored[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self._reply(200, {"commitUrl": f"{self.server.url}/{repo}/commit/0123abcd", "commitOid": "0123abcd"})
        return self._reply(404, {"error": f"no route {path}"})


@pytest.fixture
def hub():
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from tests.tiny import save_tiny_omni_folder

    return save_tiny_omni_folder(tmp_path_factory.mktemp("tiny") / "model")


def _files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _assert_canary_nowhere_on_disk(*roots: Path) -> None:
    for root in roots:
        leaked = [name for name, data in _files_under(root).items() if CANARY.encode() in data]
        assert not leaked, f"the token was written to {leaked} under {root}"


def test_push_uploads_every_file_and_the_token_only_travels_in_the_auth_header(hub, tiny_folder, tmp_path):
    out, hf_home = tmp_path / "export", tmp_path / "hf_home"
    env = dict(os.environ, HF_TOKEN=CANARY, HF_ENDPOINT=hub.url, HF_HOME=str(hf_home), HF_HUB_VERBOSITY="debug",
               HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-m", "omni.cli", "export", str(tiny_folder), str(out),
                           "--push-to-hub", REPO_ID, "--private", "--max-shard-size", "400KB"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert CANARY not in output

    assert hub.repos[REPO_ID]["visibility"] == "private"
    routes = [(r["method"], r["path"].split("?")[0]) for r in hub.requests]
    assert routes[0] == ("POST", "/api/repos/create")
    assert ("POST", f"/api/models/{REPO_ID}/preupload/main") in routes
    assert ("POST", f"/api/models/{REPO_ID}/commit/main") in routes
    local = _files_under(out)
    assert len([n for n in local if n.startswith("model-")]) > 1  # shards + index went up too
    assert hub.files[REPO_ID] == local  # every file, byte for byte
    assert f"pushed to {hub.url}/{REPO_ID}/commit/0123abcd" in proc.stdout

    for request in hub.requests:
        if request["path"] != "/api/validate-yaml":  # huggingface_hub sends that check unauthenticated
            assert request["headers"]["authorization"] == f"Bearer {CANARY}", request["path"]
        others = {k: v for k, v in request["headers"].items() if k != "authorization"}
        assert CANARY not in json.dumps(others) and CANARY not in request["path"]
        assert CANARY.encode() not in request["body"]
    _assert_canary_nowhere_on_disk(tmp_path, tiny_folder.parent)


def test_dry_run_lists_files_and_sizes_and_sends_nothing(hub, tiny_folder, tmp_path, monkeypatch, capfd):
    from omni.cli import main
    from omni.hub import upload_plan

    monkeypatch.setenv("HF_TOKEN", CANARY)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    out = tmp_path / "export"
    assert main(["export", str(tiny_folder), str(out), "--push-to-hub", REPO_ID, "--dry-run"]) == 0
    printed = capfd.readouterr()
    assert hub.requests == []
    assert "dry run, nothing uploaded" in printed.out and CANARY not in printed.out + printed.err
    plan = upload_plan(out)
    assert {rel for rel, _ in plan} == set(_files_under(out)) and "README.md" in dict(plan)
    for rel, _ in plan:
        assert rel in printed.out
    _assert_canary_nowhere_on_disk(tmp_path)


def test_a_refused_push_is_a_clear_error_without_the_token(hub, tiny_folder, monkeypatch):
    from omni.hub import HubPushError, push_folder

    monkeypatch.setenv("HF_TOKEN", CANARY)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    with pytest.raises(HubPushError, match="someone/forbidden") as info:
        push_folder(tiny_folder, "someone/forbidden", report=lambda _: None)
    assert CANARY not in str(info.value)
    assert not any("/commit/" in r["path"] for r in hub.requests)


def test_dry_run_without_push_to_hub_is_refused(tiny_folder, tmp_path, capsys):
    from omni.cli import main

    assert main(["export", str(tiny_folder), str(tmp_path / "out"), "--dry-run"]) == 2
    assert "--push-to-hub" in capsys.readouterr().err


def test_export_help_explains_every_flag(capsys):
    from omni.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--merge-lora", "--max-shard-size", "--tokenizer", "--license", "--base-model", "--overwrite",
                 "--verify", "--push-to-hub", "--private", "--dry-run", "HF_TOKEN"):
        assert flag in text, flag
