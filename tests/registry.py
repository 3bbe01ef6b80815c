"""A real ``docker-registry`` (distribution 2.8) on loopback, optionally behind a Python front
that adds bearer-token auth and fault injection (IMG-3, IMG-8; TOOLS.md §1).

    with Registry(tmp_path / "reg", mode="bearer", users={"alice": "pw"}) as reg:
        digest = reg.push("test/app", "v1", oci.image([...]))
        # clients use http://{reg.host}/v2/...

Modes:

* ``"none"``   — no auth. ``front=True`` puts the Python front in between (faults, request log).
* ``"basic"``  — the registry's own htpasswd auth (bcrypt via ``htpasswd -Bbn``). With
  ``front=True`` the front passes ``Authorization`` through untouched.
* ``"bearer"`` — the registry runs without auth on a private port; the front (always on)
  answers 401 + ``WWW-Authenticate: Bearer realm=".../token",service="tc-test-registry",
  scope="repository:REPO:pull"`` (``pull,push`` for writes), serves ``GET /token`` (HTTP
  basic against ``users``, anonymous pull if ``allow_anonymous_pull``) and proxies valid
  requests, rewriting ``Location`` from the private port to the public one.

Faults (front only), each matched by ``re.search`` on the URL path (no query) and optional
method, consumed in the order added, applied to requests that passed auth (and to /token):
``fail`` (status, optional Retry-After), ``corrupt`` (flip one body byte, length kept),
``drop`` (half the body, then close), ``respond`` (a canned response). ``reg.requests``
logs every request the front saw.

``push`` with ``auth=None`` talks to the registry process directly (bypassing the front, its
auth, faults and request log; in basic mode with the first configured user). With ``auth``
it goes through the public address and answers Basic/Bearer challenges itself.
"""
from __future__ import annotations

import atexit
import base64
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import httpx

from agent.image.model import MANIFEST_ACCEPT

from .oci import BuiltIndex, Target
from .support import free_port, wait_for

__all__ = ["DEFAULT_USERS", "SERVICE", "Fault", "Logged", "Registry", "registry", "registry_factory"]

SERVICE = "tc-test-registry"
DEFAULT_USERS = {"tcuser": "tc-Secr3t-pa55word"}
TOKEN_TTL = 300
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
        "transfer-encoding", "upgrade", "host", "content-length", "expect"}
_LIVE: set[Registry] = set()  # strong refs: a forgotten Registry still gets stopped at exit


@dataclass(frozen=True)
class Logged:
    """One request the front saw. ``fault`` names the fault applied, if any."""
    method: str
    path: str
    status: int
    has_auth: bool
    query: str = ""
    fault: str | None = None


@dataclass
class Fault:
    kind: str                          # fail | corrupt | drop | respond
    pattern: re.Pattern[str]
    times: int | None                  # None = forever
    method: str | None = None
    status: int = 503
    retry_after: str | None = None
    body: bytes = b""
    headers: dict[str, str] | None = None
    offset: int = -1                   # corrupt: which byte (negative = from the end)
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return self.pattern.search(path) is not None


class Registry:
    def __init__(self, workdir: Path, mode: str = "none", users: dict[str, str] | None = None,
                 front: bool | None = None, allow_anonymous_pull: bool = False) -> None:
        if mode not in ("none", "basic", "bearer"):
            raise ValueError(f"unknown registry mode {mode!r}")
        if mode == "bearer" and front is False:
            raise ValueError("bearer mode needs the front")
        self.workdir = Path(workdir)
        self.mode = mode
        self.users: dict[str, str] = dict(users) if users is not None else (
            dict(DEFAULT_USERS) if mode != "none" else {})
        self.front = mode == "bearer" if front is None else front
        self.allow_anonymous_pull = allow_anonymous_pull
        self.requests: list[Logged] = []
        self.faults: list[Fault] = []
        self._faults_lock = threading.Lock()
        self._tokens: dict[str, tuple[float, dict[str, set[str]], str | None]] = {}
        self._tokens_lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self.backend_port = 0
        self.port = 0

    # --- addresses -------------------------------------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the public address clients use."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def backend(self) -> str:
        """The registry process's own address (the same as ``host`` without the front)."""
        return f"127.0.0.1:{self.backend_port}"

    @property
    def credentials(self) -> tuple[str, str]:
        """The first configured user."""
        return next(iter(self.users.items()))

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> Registry:
        if shutil.which("docker-registry") is None:
            raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        _LIVE.add(self)
        try:
            if self.mode == "basic":
                self._write_htpasswd()
            for attempt in range(3):  # a free port can be taken between free_port() and bind
                self.backend_port = free_port()
                self._spawn()
                try:
                    wait_for(lambda: self._ready(self.backend) or not self.alive(), 15,
                             "docker-registry to answer GET /v2/")
                except AssertionError:
                    self._kill()
                    raise
                if self.alive():
                    break
                self._kill()
                if attempt == 2:
                    raise RuntimeError(f"docker-registry did not start:\n{self.log_text()[-3000:]}")
            if self.front:
                self._start_front()
                wait_for(lambda: self._ready(self.host), 10, "the registry front to answer GET /v2/")
            else:
                self.port = self.backend_port
        except BaseException:
            self.stop()
            raise
        return self

    def _write_htpasswd(self) -> None:
        lines = []
        for user, password in self.users.items():
            r = subprocess.run(["htpasswd", "-Bbn", user, password], capture_output=True, text=True, check=True)
            lines.append(r.stdout.strip())
        (self.workdir / "htpasswd").write_text("\n".join(lines) + "\n")

    def _config(self) -> str:
        # Our own config, never the package's (TOOLS.md §1). JSON is valid YAML.
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn", "fields": {"service": "registry"}},
            "storage": {"filesystem": {"rootdirectory": str(self.workdir / "data")},
                        "delete": {"enabled": True}, "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": self.backend, "secret": "tc-test-registry-http-secret"},
            "health": {"storagedriver": {"enabled": False}},
            # without an allow list distribution refuses every manifest with layer urls
            # (foreign / non-distributable layers, which hostile-image tests need)
            "validation": {"manifests": {"urls": {"allow": ["^https?://"]}}},
        }
        if self.mode == "basic":
            cfg["auth"] = {"htpasswd": {"realm": SERVICE, "path": str(self.workdir / "htpasswd")}}
        return json.dumps(cfg, indent=1)

    def _spawn(self) -> None:
        config = self.workdir / "config.yml"
        config.write_text(self._config())
        if self._log_file is None:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 — lives as long as the process
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self._proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=self._log_file,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                      cwd=self.workdir, start_new_session=True)

    @staticmethod
    def _ready(host: str) -> bool:
        try:
            c = http.client.HTTPConnection(host, timeout=2)
            c.request("GET", "/v2/")
            status = c.getresponse().status
            c.close()
            return status in (200, 401)
        except OSError:
            return False

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _kill(self) -> None:
        p = self._proc
        if p is None:
            return
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)  # its own session: the whole group, nothing else
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        else:
            try:  # the leader is gone; make sure no child of its group lingers
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            with self._conns_lock:
                for s in list(self._conns):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                self._conns.clear()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = None
        self._kill()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _LIVE.discard(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        """What the registry process wrote to stdout/stderr so far."""
        if self._log_file is not None:
            self._log_file.flush()
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- faults ------------------------------------------------------------------------

    def _add_fault(self, fault: Fault) -> Fault:
        if not self.front:
            raise RuntimeError("fault injection needs the front: Registry(..., front=True)")
        with self._faults_lock:
            self.faults.append(fault)
        return fault

    def fail(self, path_regex: str, status: int = 503, times: int | None = 1, retry_after: str | None = None,
             *, method: str | None = None, body: bytes | None = None) -> Fault:
        """Answer matching requests with ``status`` (and ``Retry-After``) instead of proxying them."""
        return self._add_fault(Fault("fail", re.compile(path_regex), times, method, status, retry_after,
                                     body if body is not None else
                                     json.dumps({"errors": [{"code": "UNAVAILABLE",
                                                             "message": "injected fault"}]}).encode()))

    def corrupt(self, path_regex: str, times: int | None = 1, *, method: str | None = "GET",
                offset: int = -1) -> Fault:
        """Proxy matching requests but flip the body byte at ``offset`` (length unchanged)."""
        return self._add_fault(Fault("corrupt", re.compile(path_regex), times, method, offset=offset))

    def drop(self, path_regex: str, times: int | None = 1, *, method: str | None = "GET") -> Fault:
        """Proxy matching requests but send only half the body (full Content-Length), then close."""
        return self._add_fault(Fault("drop", re.compile(path_regex), times, method))

    def respond(self, path_regex: str, status: int = 200, body: bytes = b"", headers: dict[str, str] | None = None,
                times: int | None = 1, *, method: str | None = None) -> Fault:
        """Answer matching requests with a canned response (e.g. a schema-1 manifest)."""
        return self._add_fault(Fault("respond", re.compile(path_regex), times, method, status, None, body,
                                     dict(headers or {})))

    def clear_faults(self) -> None:
        with self._faults_lock:
            self.faults.clear()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._faults_lock:
            for f in self.faults:
                if f.matches(method, path):
                    f.hits += 1
                    return f
        return None

    def count(self, path_regex: str = "", method: str | None = None, status: int | None = None) -> int:
        """How many logged requests match."""
        rx = re.compile(path_regex)
        return sum(1 for r in list(self.requests) if rx.search(r.path) and (method is None or r.method == method)
                   and (status is None or r.status == status))

    def expire_tokens(self) -> None:
        """Invalidate every bearer token issued so far."""
        with self._tokens_lock:
            self._tokens.clear()

    # --- bearer tokens -------------------------------------------------------------------

    def _issue(self, user: str | None, scopes: list[str]) -> str:
        granted: dict[str, set[str]] = {}
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3:
                continue
            kind, name, actions = parts[0], ":".join(parts[1:-1]), set(parts[-1].split(","))
            if kind == "registry":
                if user is not None:
                    granted[f"registry:{name}"] = actions
                continue
            if kind != "repository":
                continue
            allowed = {"pull", "push", "delete", "*"} if user is not None else {"pull"}
            acts = actions & allowed
            if acts:
                granted.setdefault(name, set()).update(acts)
        token = secrets.token_urlsafe(24)
        with self._tokens_lock:
            self._tokens[token] = (time.monotonic() + TOKEN_TTL, granted, user)
        return token

    def _token_ok(self, auth: str | None, need: tuple[str, set[str]] | None) -> str | None:
        """None if ``auth`` grants ``need``; else the challenge error ('' = no/invalid token)."""
        if not auth or not auth.lower().startswith("bearer "):
            return ""
        with self._tokens_lock:
            entry = self._tokens.get(auth[7:].strip())
        if entry is None or entry[0] < time.monotonic():
            return "invalid_token"
        if need is None:
            return None
        name, actions = need
        have = entry[1].get(name, set())
        return None if "*" in have or actions <= have else "insufficient_scope"

    def _check_basic(self, auth: str | None) -> tuple[bool, str | None]:
        """(ok, user): ok with user None = anonymous."""
        if not auth:
            return True, None
        if not auth.lower().startswith("basic "):
            return False, None
        try:
            user, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False, None
        if user in self.users and secrets.compare_digest(self.users[user], password):
            return True, user
        return False, None

    # --- the front -----------------------------------------------------------------------

    def _start_front(self) -> None:
        reg = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                if isinstance(sys.exc_info()[1], OSError):
                    return  # clients hanging up (and stop() shutting sockets) are normal here
                super().handle_error(request, client_address)

        class Handler(_FrontHandler):
            registry = reg

        for attempt in range(3):
            port = free_port()
            try:
                self._server = Server(("127.0.0.1", port), Handler)
                break
            except OSError:
                if attempt == 2:
                    raise
        assert self._server is not None
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"registry-front-{self.port}", daemon=True)
        self._thread.start()

    # --- pushing -------------------------------------------------------------------------

    def push(self, repo: str, tag: str | None, target: Target, *, auth: tuple[str, str] | None = None) -> str:
        """Push ``target`` as ``repo:tag`` (by digest if ``tag`` is None); returns the manifest digest.

        Blobs go up monolithically (HEAD, then POST + PUT ?digest=), then the child manifests
        of an index by digest, then the target. Without ``auth`` the push goes straight to
        the registry process; with it, through the public address answering challenges."""
        if auth is None:
            base = f"http://{self.backend}"
            basic = self.credentials if self.mode == "basic" else None
        else:
            base, basic = self.url, auth
        with _PushClient(base, basic) as c:
            for d, blob in sorted(target.blobs.items()):
                c.put_blob(repo, d, blob.data)
            if isinstance(target, BuiltIndex):
                for img in target.images:
                    c.put_manifest(repo, img.manifest_digest, img.manifest, img.manifest_media_type)
            c.put_manifest(repo, tag or target.manifest_digest, target.manifest, target.manifest_media_type)
        return target.manifest_digest

    def get_manifest(self, repo: str, ref: str, *, auth: tuple[str, str] | None = None) -> httpx.Response:
        """GET a manifest through the public address (answering challenges), for test assertions."""
        with _PushClient(self.url, auth) as c:
            return c.request("GET", f"/v2/{repo}/manifests/{ref}", scope=f"repository:{repo}:pull",
                             headers={"Accept": MANIFEST_ACCEPT})


class _PushClient:
    """A tiny registry client that answers Basic and Bearer challenges (for ``push``)."""

    def __init__(self, base: str, basic: tuple[str, str] | None) -> None:
        self.base = base
        self.basic = basic
        self.http = httpx.Client(base_url=base, timeout=30)
        self.token: str | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        h = dict(extra or {})
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        elif self.basic:
            h["Authorization"] = "Basic " + base64.b64encode(":".join(self.basic).encode()).decode()
        return h

    def request(self, method: str, url: str, *, scope: str, headers: dict[str, str] | None = None,
                content: bytes | None = None) -> httpx.Response:
        r = self.http.request(method, url, headers=self._headers(headers), content=content)
        if r.status_code == 401 and r.headers.get("www-authenticate", "").lower().startswith("bearer"):
            self._get_token(r.headers["www-authenticate"], scope)
            r = self.http.request(method, url, headers=self._headers(headers), content=content)
        return r

    def _get_token(self, challenge: str, scope: str) -> None:
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        q = {"service": params.get("service", ""), "scope": params.get("scope") or scope}
        r = httpx.get(params["realm"], params=q, auth=self.basic, timeout=30)
        if r.status_code != 200:
            raise RuntimeError(f"token request failed: {r.status_code} {r.text[:200]}")
        self.token = r.json()["token"]

    def put_blob(self, repo: str, d: str, data: bytes) -> None:
        scope = f"repository:{repo}:pull,push"
        if self.request("HEAD", f"/v2/{repo}/blobs/{d}", scope=scope).status_code == 200:
            return
        r = self.request("POST", f"/v2/{repo}/blobs/uploads/", scope=scope, content=b"")
        if r.status_code != 202:
            raise RuntimeError(f"blob upload start {repo} {d}: {r.status_code} {r.text[:300]}")
        loc = urllib.parse.urljoin(self.base + "/", r.headers["location"])
        loc += ("&" if "?" in loc else "?") + urllib.parse.urlencode({"digest": d})
        r = self.request("PUT", loc, scope=scope, content=data,
                         headers={"Content-Type": "application/octet-stream"})
        if r.status_code != 201:
            raise RuntimeError(f"blob upload {repo} {d}: {r.status_code} {r.text[:300]}")

    def put_manifest(self, repo: str, ref: str, data: bytes, media_type: str) -> None:
        r = self.request("PUT", f"/v2/{repo}/manifests/{ref}", scope=f"repository:{repo}:pull,push",
                         content=data, headers={"Content-Type": media_type})
        if r.status_code != 201:
            raise RuntimeError(f"manifest push {repo}:{ref}: {r.status_code} {r.text[:500]}")


_REPO_PATH = re.compile(r"^/v2/(?P<name>.+?)/(?P<kind>manifests|blobs|tags)(?:/|$)")


class _FrontHandler(BaseHTTPRequestHandler):
    """The front: auth (bearer mode), faults, request log, proxy to the registry process."""

    registry: Registry
    protocol_version = "HTTP/1.1"
    server_version = "tc-test-registry-front"
    timeout = 60

    def setup(self) -> None:
        super().setup()
        with self.registry._conns_lock:
            self.registry._conns.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.registry._conns_lock:
                self.registry._conns.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # every method goes through _handle
    def do_GET(self) -> None: self._handle()
    def do_HEAD(self) -> None: self._handle()
    def do_PUT(self) -> None: self._handle()
    def do_POST(self) -> None: self._handle()
    def do_PATCH(self) -> None: self._handle()
    def do_DELETE(self) -> None: self._handle()

    # --- helpers ---

    def _read_body(self) -> bytes | None:
        te = self.headers.get("Transfer-Encoding", "").lower()
        if "chunked" in te:
            out = bytearray()
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline(65537)
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            return self.rfile.read(n)
        return b"" if self.command in ("PUT", "POST", "PATCH") else None

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if not any(k.lower() == "content-length" for k in headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _log(self, status: int, fault: str | None = None) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        self.registry.requests.append(Logged(self.command, parsed.path, status,
                                             "Authorization" in self.headers, parsed.query, fault))

    def _required_scope(self, path: str) -> tuple[str, set[str]] | None:
        m = _REPO_PATH.match(path)
        if m:
            write = self.command in ("PUT", "POST", "PATCH", "DELETE")
            return m["name"], ({"pull", "push"} if write else {"pull"})
        if path.rstrip("/") == "/v2":
            return None
        return "registry:catalog", {"*"}

    def _challenge(self, need: tuple[str, set[str]] | None, error: str) -> None:
        reg = self.registry
        value = f'Bearer realm="{reg.url}/token",service="{SERVICE}"'
        if need is not None:
            name, actions = need
            if name.startswith("registry:"):
                value += f',scope="{name}:*"'
            else:
                value += f',scope="repository:{name}:{",".join(sorted(actions))}"'
        if error:
            value += f',error="{error}"'
        body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required",
                                       "detail": None}]}).encode()
        self._send(401, body, {"WWW-Authenticate": value, "Content-Type": "application/json",
                               "Docker-Distribution-API-Version": "registry/2.0"})
        self._log(401)

    def _token(self, body: bytes | None) -> None:
        reg = self.registry
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        auth = self.headers.get("Authorization")
        if self.command == "POST":  # OAuth2 password grant (docker's refresh-token path)
            form = urllib.parse.parse_qs((body or b"").decode())
            q = {**q, **form}
            if form.get("grant_type") == ["password"]:
                auth = "Basic " + base64.b64encode(
                    f"{form.get('username', [''])[0]}:{form.get('password', [''])[0]}".encode()).decode()
        ok, user = reg._check_basic(auth)
        if not ok or (user is None and not reg.allow_anonymous_pull):
            self._send(401, json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}).encode(),
                       {"WWW-Authenticate": f'Basic realm="{SERVICE}"', "Content-Type": "application/json"})
            self._log(401)
            return
        scopes = [s for v in q.get("scope", []) for s in v.split(" ") if s]
        token = reg._issue(user, scopes)
        doc = {"token": token, "access_token": token, "expires_in": TOKEN_TTL,
               "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._send(200, json.dumps(doc).encode(), {"Content-Type": "application/json"})
        self._log(200)

    def _apply_simple_fault(self, fault: Fault) -> None:
        if fault.kind == "fail":
            h = {"Content-Type": "application/json"}
            if fault.retry_after is not None:
                h["Retry-After"] = fault.retry_after
            self._send(fault.status, fault.body, h)
        else:  # respond
            self._send(fault.status, fault.body, dict(fault.headers or {}))
        self._log(fault.status, fault.kind)

    # --- the request ---

    def _handle(self) -> None:
        reg = self.registry
        try:
            body = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            return
        path = urllib.parse.urlsplit(self.path).path
        fault: Fault | None = None
        if reg.mode == "bearer" and path.rstrip("/") == "/token":
            fault = reg._take_fault(self.command, path)
            if fault and fault.kind in ("fail", "respond"):
                return self._apply_simple_fault(fault)
            return self._token(body)
        if reg.mode == "bearer":
            need = self._required_scope(path)
            err = reg._token_ok(self.headers.get("Authorization"), need)
            if err is not None:
                return self._challenge(need, err)
        fault = reg._take_fault(self.command, path)
        if fault and fault.kind in ("fail", "respond"):
            return self._apply_simple_fault(fault)
        self._proxy(body, fault)

    def _proxy(self, body: bytes | None, fault: Fault | None) -> None:
        reg = self.registry
        conn = http.client.HTTPConnection("127.0.0.1", reg.backend_port, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", reg.backend)
            for k, v in self.headers.items():
                lk = k.lower()
                if lk in _HOP or (lk == "authorization" and reg.mode == "bearer"):
                    continue
                conn.putheader(k, v)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body if body else None)
            resp = conn.getresponse()
        except OSError as exc:
            conn.close()
            self._send(502, f"backend error: {exc}".encode(), {"Content-Type": "text/plain"})
            self._log(502)
            return
        try:
            self._relay(resp, fault)
        finally:
            conn.close()

    def _relay(self, resp: http.client.HTTPResponse, fault: Fault | None) -> None:
        reg = self.registry
        headers = []
        length: int | None = None
        for k, v in resp.getheaders():
            lk = k.lower()
            if lk == "content-length":
                length = int(v)
                continue
            if lk in _HOP:
                continue
            if lk == "location":
                v = v.replace(f"//{reg.backend}", f"//{reg.host}").replace(
                    f"//localhost:{reg.backend_port}", f"//{reg.host}")
            headers.append((k, v))
        no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        data: bytes | None = None
        if length is None and not no_body:
            data = resp.read()
            length = len(data)
        self.send_response(resp.status)
        for k, v in headers:
            self.send_header(k, v)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        kind = fault.kind if fault else None
        if no_body or not length:
            self._log(resp.status, kind)
            return
        assert length is not None
        flip = None
        if kind == "corrupt":
            flip = fault.offset if fault.offset >= 0 else length + fault.offset  # type: ignore[union-attr]
        limit = length // 2 if kind == "drop" else length
        sent = 0
        chunks: Iterator[bytes] = iter([data]) if data is not None else _chunks(resp)
        for chunk in chunks:
            if flip is not None and sent <= flip < sent + len(chunk):
                b = bytearray(chunk)
                b[flip - sent] ^= 0xFF
                chunk = bytes(b)
            if sent + len(chunk) > limit:
                chunk = chunk[:limit - sent]
            if chunk:
                self.wfile.write(chunk)
            sent += len(chunk)
            if sent >= limit:
                break
        self._log(resp.status, kind)
        if kind == "drop":
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _chunks(resp: http.client.HTTPResponse, size: int = 65536) -> Iterator[bytes]:
    while True:
        chunk = resp.read(size)
        if not chunk:
            return
        yield chunk


@atexit.register
def _stop_strays() -> None:
    for reg in list(_LIVE):
        try:
            reg.stop()
        except Exception:  # noqa: BLE001, S110 — best effort at interpreter exit
            pass


# --- pytest fixtures (register with pytest_plugins = ["tests.registry"]) -------------------

try:
    import pytest
except ImportError:  # pragma: no cover — the module is also usable outside pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    @pytest.fixture
    def registry_factory(tmp_path: Path) -> Iterator[Callable[..., Registry]]:
        """``registry_factory(mode="none", **kw)`` starts a Registry in tmp_path; all are
        stopped (process group killed) at teardown. Skips if docker-registry is missing."""
        if shutil.which("docker-registry") is None:
            pytest.skip("docker-registry is not installed")
        started: list[Registry] = []

        def make(mode: str = "none", **kw: Any) -> Registry:
            reg = Registry(tmp_path / f"registry-{len(started)}", mode=mode, **kw)
            started.append(reg)
            return reg.start()

        try:
            yield make
        finally:
            for reg in started:
                reg.stop()

    @pytest.fixture
    def registry(registry_factory: Callable[..., Registry]) -> Registry:
        """A started no-auth registry without the front."""
        return registry_factory("none")
