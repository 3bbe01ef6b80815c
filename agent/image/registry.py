"""A small registry v2 client and the registry image source (SPEC IMG-3, IMG-6, IMG-8, IMG-11).

Transport (IMG-3): https, or http for hosts in ``image.insecure_registries``. Requests start
anonymous; a 401 carries a ``WWW-Authenticate`` challenge:

* ``Basic`` -> the request is sent again with the basic credentials (none: ImageAuthFailed);
* ``Bearer realm=..,service=..,scope=..`` -> a token is fetched from the realm (with basic
  credentials when we have them, anonymously otherwise), cached per scope and used from then
  on. A cached token that stops working is refreshed once.

401/403 after authenticating is ImageAuthFailed naming the registry host (never the
password). 404, ``MANIFEST_UNKNOWN``, ``NAME_UNKNOWN`` and ``BLOB_UNKNOWN`` are
ImageNotFound.

Retries (IMG-8): connection errors, timeouts, 429 and 5xx get ``retries`` retries with
exponential backoff (``backoff=(base, cap)``), honouring ``Retry-After`` (seconds or an HTTP
date, capped at ``MAX_RETRY_AFTER``); then ImageRegistryUnavailable naming the host and the
last status. A transport drop in the middle of a blob body counts as one of those retries
(``out`` is rewound and truncated). Bytes are verified as they stream: more bytes than the
descriptor's size stop the download; a digest or size mismatch refetches once, then
ImageDigestMismatch ``{digest, expected, actual}``. Manifests fetched by digest are verified
the same way; the manifest digest is always computed locally (a ``Docker-Content-Digest``
header that disagrees is a mismatch).

Redirects (blob storage) are followed by hand, at most ``MAX_REDIRECTS``; the Authorization
header is only ever sent to the registry's own scheme/host/port.

Secrets: credentials live in a ``model.Credentials`` (redacted repr) and in prepared header
values inside the client; they never go into log lines, exception messages/details, reprs or
results.

The auth half is agent/image/registry_auth.py, the retry budget agent/image/registry_retry.py.
"""
from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Callable
from typing import BinaryIO, Self
from urllib.parse import urljoin

import httpx

from protocol.config import ImageConfig
from protocol.errors import (
    ImageDigestMismatch,
    ImageInvalid,
    ImageNotFound,
    ImageRegistryUnavailable,
)

from . import manifest as mf
from . import model
from .model import Credentials, Descriptor, Platform, ResolvedImage
from .reference import Reference
# Auth and the retry budget live in their own modules; their public names stay importable here.
from .registry_auth import RegistryAuth, parse_challenge
from .registry_retry import MAX_RETRY_AFTER, Budget, Retry, error_codes, parse_retry_after

__all__ = [
    "CHUNK",
    "MAX_REDIRECTS",
    "MAX_RETRY_AFTER",
    "RegistryClient",
    "RegistrySource",
    "parse_challenge",
    "parse_retry_after",
]

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_REDIRECTS = 5
_NOT_FOUND_CODES = {"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN", "NOT_FOUND"}
_AUTH_CODES = {"UNAUTHORIZED", "DENIED"}


class _Mismatch(Exception):
    def __init__(self, actual: str, size: int) -> None:
        super().__init__(actual)
        self.actual = actual
        self.size = size


class RegistryClient(RegistryAuth):
    """Registry v2 client for one host (see the module docstring)."""

    def __init__(self, host: str, *, insecure: bool = False, credentials: Credentials | None = None,
                 retries: int = 3, timeout: float = 30.0, backoff: tuple[float, float] = (0.5, 8.0),
                 sleep: Callable[[float], None] = time.sleep,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.host = host
        self.base = f"{'http' if insecure else 'https'}://{host}"
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self._sleep = sleep
        self._init_auth(credentials)
        kwargs = {"transport": transport} if transport is not None else {}
        self._http = httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False, **kwargs)
        self._origin = self._origin_of(self.base)

    def __repr__(self) -> str:
        return f"RegistryClient(host={self.host!r}, base={self.base!r})"

    def close(self) -> None:
        self._http.close()

    # --- requests ----------------------------------------------------------------------

    def _send(self, url: str, repo: str, accept: str | None, budget: Budget, *, stream: bool) -> httpx.Response:
        """GET ``url`` with auth, redirects and retries; the response is 200 (streamed if asked;
        the caller closes it). Errors become TCErrors."""
        scope = f"repository:{repo}:pull"
        authed_now = False
        while True:
            try:
                resp = self._get_following(url, scope, accept, stream)
            except httpx.TransportError as exc:
                budget.fail(Retry(f"{type(exc).__name__}"))
                continue
            status = resp.status_code
            if status == 200:
                return resp
            try:
                resp.read()
            except httpx.TransportError:
                pass
            finally:
                resp.close()
            if status == 401:
                if authed_now:
                    raise self._auth_failed("refused the credentials" if self._creds else "requires credentials")
                # A cached token/basic header from an earlier request is refreshed once.
                self._tokens.pop(scope, None)
                self._authenticate(resp, scope, budget)
                authed_now = True
                continue
            if status == 403:
                raise self._auth_failed("denied access" if self._creds else "requires credentials")
            if status == 404 or error_codes(resp) & _NOT_FOUND_CODES:
                raise ImageNotFound(f"not found on registry {self.host}: {repo}", {"registry": self.host,
                                                                                    "repository": repo})
            if status == 429 or status >= 500:
                budget.fail(Retry(f"status {status}", parse_retry_after(resp.headers.get("retry-after"))))
                continue
            if error_codes(resp) & _AUTH_CODES:
                raise self._auth_failed("denied access")
            raise ImageRegistryUnavailable(f"registry {self.host} answered status {status}",
                                           {"registry": self.host, "status": status})

    def _get_following(self, url: str, scope: str, accept: str | None, stream: bool) -> httpx.Response:
        for _ in range(MAX_REDIRECTS + 1):
            headers = {"Accept": accept} if accept else {}
            if self._origin_of(url) == self._origin:
                auth = self._auth_header(scope)
                if auth:
                    headers["Authorization"] = auth
            req = self._http.build_request("GET", url, headers=headers)
            resp = self._http.send(req, stream=stream)
            if resp.status_code in (301, 302, 303, 307, 308) and "location" in resp.headers:
                url = urljoin(url, resp.headers["location"])
                resp.close()
                continue
            return resp
        raise ImageRegistryUnavailable(f"registry {self.host}: too many redirects", {"registry": self.host})

    # --- manifests ---------------------------------------------------------------------

    def get_manifest(self, repo: str, ref: str) -> tuple[str, bytes, str]:
        """(media type, raw bytes, sha256 digest). By digest: verified, refetched once on a
        mismatch, then ImageDigestMismatch."""
        by_digest = ref.startswith("sha256:")
        url = f"{self.base}/v2/{repo}/manifests/{ref}"
        budget = Budget(self)
        for attempt in (1, 2):
            resp = self._send(url, repo, model.MANIFEST_ACCEPT, budget, stream=True)
            try:
                body = self._read_capped(resp, mf.MAX_MANIFEST_BYTES, budget)
            finally:
                resp.close()
            if body is None:
                continue
            digest = mf.sha256_digest(body)
            header = resp.headers.get("docker-content-digest")
            expected = ref if by_digest else (header if header and header.startswith("sha256:") else digest)
            if digest == expected:
                return resp.headers.get("content-type", ""), body, digest
            if attempt == 2:
                raise ImageDigestMismatch(f"manifest {repo}:{ref} from {self.host} does not match its digest",
                                          {"digest": expected, "expected": expected, "actual": digest})
            log.warning("registry %s: manifest %s digest mismatch, fetching again", self.host, ref)
        raise AssertionError("unreachable")

    def _read_capped(self, resp: httpx.Response, cap: int, budget: Budget) -> bytes | None:
        buf = bytearray()
        try:
            for chunk in resp.iter_bytes(CHUNK):
                buf += chunk
                if len(buf) > cap:
                    raise ImageInvalid(f"manifest from {self.host} is larger than {cap} bytes")
        except httpx.TransportError as exc:
            budget.fail(Retry(f"{type(exc).__name__} while reading"))
            return None
        return bytes(buf)

    # --- blobs -------------------------------------------------------------------------

    def fetch_blob(self, repo: str, desc: Descriptor, out: BinaryIO,
                   progress: Callable[[int], None] | None = None) -> None:
        """Write the verified blob to ``out`` (from its current position; see module docstring)."""
        model.check_digest(desc.digest)
        url = f"{self.base}/v2/{repo}/blobs/{desc.digest}"
        start = out.tell()
        budget = Budget(self)
        mismatches = 0
        while True:
            out.seek(start)
            out.truncate()
            resp = self._send(url, repo, None, budget, stream=True)
            try:
                self._stream(resp, desc, out, progress)
                return
            except Retry as exc:
                budget.fail(exc)
            except _Mismatch as exc:
                mismatches += 1
                if mismatches > 1:
                    out.seek(start)
                    out.truncate()
                    raise ImageDigestMismatch(
                        f"blob {desc.digest} from {self.host} does not match its descriptor",
                        {"digest": desc.digest, "expected": desc.digest, "actual": exc.actual,
                         "expected_size": desc.size, "actual_size": exc.size}) from None
                log.warning("registry %s: blob %s mismatch (got %s, %d bytes), fetching again",
                            self.host, desc.digest, exc.actual, exc.size)
            finally:
                resp.close()

    @staticmethod
    def _stream(resp: httpx.Response, desc: Descriptor, out: BinaryIO,
                progress: Callable[[int], None] | None) -> None:
        h = hashlib.sha256()
        written = 0
        try:
            length = int(resp.headers.get("content-length", "-1"))
        except ValueError:
            length = -1
        if length > desc.size:
            raise _Mismatch("unknown", length)
        try:
            for chunk in resp.iter_bytes(CHUNK):
                if written + len(chunk) > desc.size:
                    h.update(chunk)
                    raise _Mismatch("sha256:" + h.hexdigest(), written + len(chunk))
                h.update(chunk)
                out.write(chunk)
                written += len(chunk)
                if progress is not None:
                    progress(written)
        except httpx.TransportError as exc:
            raise Retry(f"{type(exc).__name__} while reading blob") from None
        actual = "sha256:" + h.hexdigest()
        if actual != desc.digest or written != desc.size:
            raise _Mismatch(actual, written)

    def get_blob_bytes(self, repo: str, desc: Descriptor, cap: int) -> bytes:
        """A small verified blob (the config) in memory; ImageInvalid above ``cap`` bytes."""
        if desc.size > cap:
            raise ImageInvalid(f"blob {desc.digest} is larger than {cap} bytes", {"digest": desc.digest})
        buf = io.BytesIO()
        self.fetch_blob(repo, desc, buf)
        return buf.getvalue()


class RegistrySource:
    """``model.ImageSource`` for registry references (IMG-3, IMG-6, IMG-11)."""

    def __init__(self, ref: Reference, *, platform: Platform, image_cfg: ImageConfig,
                 credentials: Credentials | None = None, sleep: Callable[[float], None] = time.sleep,
                 timeout: float = 30.0, transport: httpx.BaseTransport | None = None) -> None:
        if ref.transport != "docker":
            raise ValueError(f"not a registry reference: {ref}")
        self.ref = ref
        self.platform = platform
        self.client = RegistryClient(ref.registry, insecure=ref.registry in (image_cfg.insecure_registries or []),
                                     credentials=credentials, retries=image_cfg.registry_retries,
                                     timeout=timeout, sleep=sleep, transport=transport)

    def __repr__(self) -> str:
        return f"RegistrySource({str(self.ref)!r}, platform={str(self.platform)!r})"

    def resolve(self) -> ResolvedImage:
        repo = self.ref.repository
        content_type, body, digest = self.client.get_manifest(repo, self.ref.digest or self.ref.tag or "latest")
        doc = mf.parse_document(body, content_type)
        for _ in range(mf.MAX_INDEX_DEPTH):
            if isinstance(doc, mf.Manifest):
                break
            entry = mf.select_platform(doc, self.platform)
            content_type, body, digest = self.client.get_manifest(repo, entry.descriptor.digest)
            doc = mf.parse_document(body, content_type or entry.descriptor.media_type)
        if not isinstance(doc, mf.Manifest):
            raise ImageInvalid("image indexes nested too deeply")
        config = self.client.get_blob_bytes(repo, doc.config, mf.MAX_CONFIG_BYTES)
        return mf.build_resolved(str(self.ref), digest, doc, config, self.platform)

    def fetch_blob(self, desc: Descriptor, out: BinaryIO, progress: Callable[[int], None] | None = None) -> None:
        self.client.fetch_blob(self.ref.repository, desc, out, progress)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
