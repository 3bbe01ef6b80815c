"""Transfer grants a source agent holds in memory (SPEC DIST-4, SEC-6).

The coordinator sends GRANT ``{artifact_id, token, expires, target_node, target_key}`` to the
source before it sends FETCH_ARTIFACT to the target. The blob endpoint serves a FETCH only
under a live grant whose artifact and token match and whose *requester* matches:

* CURVE on: the requester's proven CURVE public key (the ``User-Id`` the agent's ZAP handler
  sets) must equal ``target_key``; what the peer claims about itself plays no part.
* CURVE off (loopback tests only, SEC-1): the requester's ROUTER identity must be
  ``<target_node>`` or ``<target_node>/<anything>`` — a claim, not a proof, which is all a
  plain-TCP test set-up can offer.

Grants live only in memory: after an agent restart the coordinator re-grants (a target then
sees TransferTokenInvalid once and its assignment moves on, DIST-5). An expired grant is never
served; it is kept ``keep_expired`` (1 h) longer so its target hears TransferTokenExpired (and
asks for a new token) rather than TransferTokenInvalid, then dropped on the next ``add``. A token never appears whole in a log line or an error:
:func:`short` shows its first 8 hex digits (SEC-6, SEC-8).
"""
from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass
from typing import Callable

from protocol.errors import TransferTokenExpired, TransferTokenInvalid


def short(token: str) -> str:
    """What a log line may show of a token: at most 8 hex digits (SEC-6)."""
    return (token[:8] + "…") if token else "-"


@dataclass(frozen=True, slots=True)
class Grant:
    artifact_id: str
    token: str
    expires_ms: int
    target_node: str
    target_key: str  # z85 public key, "" with CURVE off

    def requester_matches(self, peer_key: str | None, identity: bytes) -> bool:
        if self.target_key:
            return peer_key is not None and hmac.compare_digest(peer_key, self.target_key)
        node = identity.split(b"/", 1)[0]
        return node == self.target_node.encode()


class GrantTable:
    """Live grants keyed by (artifact, token); thread-safe, cheap to check per FETCH."""

    def __init__(self, clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
                 keep_expired_ms: int = 3_600_000) -> None:
        self._clock_ms = clock_ms
        self._keep_ms = keep_expired_ms
        self._lock = threading.Lock()
        self._grants: dict[tuple[str, str], Grant] = {}

    def add(self, grant: Grant) -> None:
        """One grant per (artifact, target): a new token for the same pair replaces the old one."""
        with self._lock:
            self._prune_locked()
            for key, g in list(self._grants.items()):
                if g.artifact_id == grant.artifact_id and g.target_node == grant.target_node:
                    del self._grants[key]
            self._grants[(grant.artifact_id, grant.token)] = grant

    def revoke(self, artifact_id: str, target_node: str | None = None) -> int:
        with self._lock:
            gone = [k for k, g in self._grants.items() if g.artifact_id == artifact_id
                    and (target_node is None or g.target_node == target_node)]
            for k in gone:
                del self._grants[k]
            return len(gone)

    def check(self, artifact_id: str, token: str, peer_key: str | None, identity: bytes) -> Grant:
        """The grant this FETCH is served under; TransferTokenInvalid or TransferTokenExpired otherwise.

        An expired grant is reported as expired (so the target asks for a new one) only to its
        own requester; anyone else learns nothing beyond "invalid"."""
        now = self._clock_ms()
        with self._lock:
            grant = self._grants.get((artifact_id, token))
            if grant is not None and not grant.requester_matches(peer_key, identity):
                grant = None
            if grant is not None and grant.expires_ms <= now:
                # Kept: the other FETCHes in flight under it must hear "expired" too.
                raise TransferTokenExpired(
                    f"the transfer grant for {artifact_id} (token {short(token)}) expired; ask the "
                    "coordinator for a new one", {"artifact_id": artifact_id})
        if grant is None:
            raise TransferTokenInvalid(
                f"no transfer grant matches artifact {artifact_id}, token {short(token)} and this requester",
                {"artifact_id": artifact_id})
        return grant

    def live(self) -> list[Grant]:
        """Grants that are not expired."""
        now = self._clock_ms()
        with self._lock:
            return [g for g in self._grants.values() if g.expires_ms > now]

    def __len__(self) -> int:
        with self._lock:
            return len(self._grants)

    def _prune_locked(self) -> None:
        cutoff = self._clock_ms() - self._keep_ms
        for k in [k for k, g in self._grants.items() if g.expires_ms <= cutoff]:
            del self._grants[k]
