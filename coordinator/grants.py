"""Transfer grants (DIST-4, DIST-5, SEC-6): the coordinator authorises each artifact transfer.

For one (artifact, target) assignment the source agent gets GRANT {artifact, token, expiry,
target node and key} and must confirm it (GRANT_ACK) before the target is told to fetch; the
target gets the token in its FETCH_ARTIFACT task. A target whose token expired asks again
(TOKEN_REQUEST): the same source gets a fresh grant and the target a TOKEN. Tokens are 256
random bits, kept only in memory and shown in logs by their first 8 hex digits.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

from protocol.errors import NodeUnavailable, TransferTokenInvalid
from protocol.message import Message
from protocol.messages import Error, Grant, GrantAck, TokenGrant, TokenRequest

from .keys import KeyRegistry

log = logging.getLogger(__name__)


@dataclass
class _Live:
    source: str
    token: str
    expires_ms: int


class Grants:
    def __init__(self, reply: Callable[[bytes, Message], None], keys: KeyRegistry | None, *,
                 ttl_s: float = 3600.0, ack_timeout: float = 10.0, clock: Callable[[], float] = time.time) -> None:
        self._reply = reply
        self._keys = keys
        self.ttl_s = ttl_s
        self.ack_timeout = ack_timeout
        self._clock = clock
        self._acks: dict[str, asyncio.Future[None]] = {}
        self._live: dict[tuple[str, str], _Live] = {}   # (artifact, target) -> the current grant
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(4)

    def _key_of(self, node_id: str) -> str:
        if self._keys is None:
            return ""
        return self._keys.by_node.get(node_id, "")

    async def grant(self, source: str, artifact_id: str, target: str) -> dict[str, Any]:
        """Issue a grant on ``source`` and wait for its GRANT_ACK; returns what the target needs:
        {token, expires, source_key}. NodeUnavailable naming the source if it does not confirm."""
        token = secrets.token_hex(32)
        expires = int((self._clock() + self.ttl_s) * 1000)
        msg_id = f"{self._prefix}-g{next(self._ids)}"
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks[msg_id] = fut
        try:
            self._reply(source.encode(), Grant(msg_id=msg_id, artifact_id=artifact_id, token=token, expires=expires,
                                               target_node=target, target_key=self._key_of(target)))
            await asyncio.wait_for(fut, self.ack_timeout)
        except asyncio.TimeoutError:
            raise NodeUnavailable(f"source {source} did not confirm the grant for {artifact_id}",
                                  {"node": source, "artifact_id": artifact_id}) from None
        finally:
            self._acks.pop(msg_id, None)
        self._live[(artifact_id, target)] = _Live(source, token, expires)
        log.info("grant %s → %s for %s (token %s…)", source, target, artifact_id, token[:8])
        return {"token": token, "expires": expires, "source_key": self._key_of(source)}

    def on_ack(self, node_id: str, msg: GrantAck) -> None:
        fut = self._acks.get(msg.parent_id)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def on_token_request(self, node_id: str, msg: TokenRequest) -> Message:
        """DIST-5: renew the grant of a live assignment for its target; anything else is
        TransferTokenInvalid (the assignment ends and the job may pick another source)."""
        live = self._live.get((msg.artifact_id, node_id))
        if live is None or live.source != msg.source_node:
            return Error.of(TransferTokenInvalid(f"no transfer of {msg.artifact_id} from {msg.source_node} "
                                                 f"to {node_id} is assigned", {"artifact_id": msg.artifact_id}),
                            msg.msg_id)
        fresh = await self.grant(live.source, msg.artifact_id, node_id)
        return TokenGrant(parent_id=msg.msg_id, artifact_id=msg.artifact_id, token=fresh["token"],
                          expires=fresh["expires"])

    def done(self, artifact_id: str, target: str) -> None:
        self._live.pop((artifact_id, target), None)
