"""A local stand-in of the Hugging Face Hub's HTTP endpoints that huggingface_hub's own code calls to
create a repository, upload a folder (preupload + commit, every file sent inline as a regular blob) and
download a snapshot (repo info, tree listing, resolve), served on loopback for the Hub tests. It keeps
repositories in memory: {repo_id: [(commit sha, {path: bytes}), ...]}; "main" is the newest commit."""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class HubStandIn:
    def __init__(self):
        self.repos: dict[str, list[tuple[str, dict[str, bytes]]]] = {}
        self.requests: list[tuple[str, str]] = []
        self.cards: list[dict] = []  # the model cards' metadata, as validated
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def commit(self, repo: str, files: dict[str, bytes]) -> str:
        history = self.repos[repo]
        tree = dict(history[-1][1]) if history else {}
        tree.update(files)
        sha = hashlib.sha1(f"{repo}{len(history)}{sorted(files)}".encode()).hexdigest()
        history.append((sha, tree))
        return sha

    def snapshot(self, repo: str, revision: str):
        history = self.repos.get(repo)
        if history is None:
            return None
        if revision == "main":
            return history[-1] if history else None
        return next((c for c in history if c[0] == revision), None)


def _handler(hub: HubStandIn):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status, body=b"", headers=None, head=False):
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status, code, message):
            self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

        def _body(self):
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_POST(self):
            path = urlparse(self.path).path
            hub.requests.append(("POST", path))
            body = self._body()
            if path == "/api/repos/create":
                req = json.loads(body)
                repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                if repo in hub.repos:
                    return self._error(409, "RepoExists", "You already created this model repo")
                hub.repos[repo] = []
                return self._send(200, {"url": f"{hub.endpoint}/{repo}", "name": repo})
            if path == "/api/validate-yaml":  # the model card's metadata block must be valid YAML
                import yaml

                content = json.loads(body)["content"]
                block = content.split("---")[1] if content.startswith("---") else ""
                try:
                    meta = yaml.safe_load(block)
                    if meta is not None and not isinstance(meta, dict):
                        raise ValueError("metadata must be a mapping")
                except Exception as e:
                    return self._send(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
                hub.cards.append(meta)
                return self._send(200, {"errors": [], "warnings": []})
            parts = path.split("/")  # /api/models/org/name/(preupload|commit)/rev
            if len(parts) >= 7 and parts[1:3] == ["api", "models"]:
                repo, action = f"{parts[3]}/{parts[4]}", parts[5]
                if repo not in hub.repos:
                    return self._error(404, "RepoNotFound", f"Repository {repo} not found")
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                      for f in files]})
                if action == "commit":
                    files = {}
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] != "header":
                            return self._error(400, "BadRequest", f"stand-in: unsupported commit operation {item['key']}")
                    sha = hub.commit(repo, files)
                    return self._send(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{sha}", "commitOid": sha})
            return self._error(404, "EntryNotFound", f"stand-in: no route POST {path}")

        def do_HEAD(self):
            self._get(head=True)

        def do_GET(self):
            self._get(head=False)

        def _get(self, head):
            path = unquote(urlparse(self.path).path)
            hub.requests.append(("HEAD" if head else "GET", path))
            parts = path.split("/")
            if len(parts) >= 7 and parts[1:3] == ["api", "models"] and parts[5] in ("revision", "tree"):
                repo, rev = f"{parts[3]}/{parts[4]}", parts[6]
                if repo not in hub.repos:
                    return self._error(404, "RepoNotFound", f"Repository {repo} not found")
                snap = hub.snapshot(repo, rev)
                if snap is None:
                    return self._error(404, "RevisionNotFound", f"Revision {rev} not found")
                sha, tree = snap
                if parts[5] == "revision":
                    return self._send(200, {"id": repo, "modelId": repo, "sha": sha, "private": False,
                                            "siblings": [{"rfilename": p} for p in sorted(tree)]}, head=head)
                entries = [{"type": "file", "path": p, "size": len(b),
                            "oid": hashlib.sha1(b"blob %d\0" % len(b) + b).hexdigest()} for p, b in sorted(tree.items())]
                return self._send(200, entries, head=head)
            if len(parts) >= 6 and parts[3] == "resolve":  # /org/name/resolve/rev/path
                repo, rev, file = f"{parts[1]}/{parts[2]}", parts[4], "/".join(parts[5:])
                snap = hub.snapshot(repo, rev)
                if repo not in hub.repos:
                    return self._error(404, "RepoNotFound", f"Repository {repo} not found")
                if snap is None:
                    return self._error(404, "RevisionNotFound", f"Revision {rev} not found")
                sha, tree = snap
                if file not in tree:
                    return self._error(404, "EntryNotFound", f"{file} not found")
                data = tree[file]
                etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                return self._send(200, data, {"X-Repo-Commit": sha, "ETag": f'"{etag}"'}, head=head)
            return self._error(404, "EntryNotFound", f"stand-in: no route GET {path}")

    return Handler
