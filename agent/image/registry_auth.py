"""Registry authentication (SPEC IMG-3, IMG-6; agent/image/registry.py): a 401's
``WWW-Authenticate`` challenge answered with the basic credentials (``Basic``) or with a
bearer token fetched from the realm and cached per scope (``Bearer``). The Authorization
header only ever goes to the registry's own scheme/host/port; credentials stay in prepared
header values and never reach log lines, errors or reprs."""
from __future__ import annotations

import base64
import re
from urllib.parse import urlencode, urlsplit

import httpx

from protocol.errors import ImageAuthFailed

from .model import Credentials
from .registry_retry import Budget, Retry, parse_retry_after

MAX_TOKEN_BYTES = 1 << 20
_PARAM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*,?')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``WWW-Authenticate`` -> (scheme lowercased, params). Unknown/garbled -> ("", {})."""
    header = header.strip()
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value or "")
        pos = m.end()
    return scheme.lower(), params


class RegistryAuth:
    """The auth half of RegistryClient (a base class, so the client's requests keep calling
    ``self._auth_header`` and ``self._authenticate``)."""

    host: str
    _http: httpx.Client

    def _init_auth(self, credentials: Credentials | None) -> None:
        self._creds = credentials
        self._basic_header = None
        if credentials is not None:
            raw = f"{credentials.username}:{credentials.password}".encode()
            self._basic_header = "Basic " + base64.b64encode(raw).decode()
        self._use_basic = False
        self._tokens: dict[str, str] = {}

    @staticmethod
    def _origin_of(url: str) -> tuple[str, str, int | None]:
        u = httpx.URL(url)
        port = u.port or (443 if u.scheme == "https" else 80)
        return (u.scheme, u.host, port)

    def _auth_header(self, scope: str) -> str | None:
        token = self._tokens.get(scope)
        if token is not None:
            return f"Bearer {token}"
        if self._use_basic:
            return self._basic_header
        return None

    def _authenticate(self, resp: httpx.Response, scope: str, budget: Budget) -> None:
        challenges = resp.headers.get_list("www-authenticate")
        parsed = [parse_challenge(c) for c in challenges]
        bearer = next((p for s, p in parsed if s == "bearer"), None)
        if bearer is not None:
            self._tokens[scope] = self._fetch_token(bearer, scope, budget)
            return
        if any(s == "basic" for s, _ in parsed):
            if self._basic_header is None:
                raise self._auth_failed("requires credentials")
            self._use_basic = True
            return
        raise self._auth_failed("sent an unsupported authentication challenge")

    def _fetch_token(self, params: dict[str, str], scope: str, budget: Budget) -> str:
        realm = params.get("realm", "")
        if urlsplit(realm).scheme not in ("http", "https"):
            raise self._auth_failed("sent a token realm that is not an http(s) URL")
        query = {"service": params["service"]} if params.get("service") else {}
        query["scope"] = params.get("scope") or scope
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        headers = {"Authorization": self._basic_header} if self._basic_header else {}
        while True:
            try:
                resp = self._http.get(url, headers=headers)
            except httpx.TransportError as exc:
                budget.fail(Retry(f"token request failed: {type(exc).__name__}"))
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                budget.fail(Retry(f"token endpoint status {resp.status_code}",
                                   parse_retry_after(resp.headers.get("retry-after"))))
                continue
            if resp.status_code in (401, 403):
                raise self._auth_failed("refused the credentials" if self._basic_header else "requires credentials")
            if resp.status_code != 200 or len(resp.content) > MAX_TOKEN_BYTES:
                raise self._auth_failed(f"token endpoint answered status {resp.status_code}")
            try:
                body = resp.json()
            except ValueError:
                body = None
            token = (body.get("token") or body.get("access_token")) if isinstance(body, dict) else None
            if not isinstance(token, str) or not token:
                raise self._auth_failed("token endpoint returned no token")
            return token

    def _auth_failed(self, what: str) -> ImageAuthFailed:
        return ImageAuthFailed(f"registry {self.host} {what}", {"registry": self.host})
