"""What a live session tells the coordinator about this node (SPEC WIRE-9, CAT-4, CAT-5, SNAP-19).

Heartbeats and what goes with them: the versions map and the runtime refs report when their
digests changed (WIRE-9), whatever a HEARTBEAT_ACK ``wants``, catalog snapshots in pages
(CAT-5) and coalesced CATALOG_DELTAs (CAT-4). A mixin of :class:`agent.session.Session`,
split off so that module keeps the connection loop; sockets, ids and sending come from it.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from protocol import canonical
from protocol.messages import CatalogDelta, CatalogSnapshot, Heartbeat, HeartbeatAck, RuntimeRefs, Versions

from . import facts as host
from .session_state import _Live

if TYPE_CHECKING:
    from protocol.message import Message

    from .catalog import Catalog, CatalogFeed
    from .config import AgentConfig
    from .runtime_refs import RefsReport
    from .session_state import HelloInfo, MsgIds

log = logging.getLogger("session")  # the session's logger: log lines stay the session's

MAX_PAGE = 1000  # CatalogSnapshot.entries accepts at most this many (CAT-5)
DELTA_COALESCE = 0.5  # s: changes within this window go out as one CATALOG_DELTA (CAT-4)


class SessionSync:
    """Heartbeats, versions, runtime refs and the catalog feed of one live session."""

    _cfg: AgentConfig
    _catalog: Catalog
    _feed: CatalogFeed
    _refs: RefsReport
    _changed: asyncio.Event | None
    _versions: host.VersionsCache
    _info: HelloInfo
    _ids: MsgIds
    _page_size: int
    counters: collections.Counter[str]

    if TYPE_CHECKING:  # provided by Session
        async def _send(self, sock: zmq.asyncio.Socket, msg: Message) -> bool: ...

    def _liveness(self, interval: float) -> float:
        configured = self._cfg.agent.liveness
        return configured if configured is not None else max(10.0, 5 * interval)

    async def _beat(self, sock: zmq.asyncio.Socket, live: _Live) -> None:
        await self._flush_catalog(sock, live)  # so the beat's catalog seq is one the mirror can have
        versions = await self._current_versions()
        digest = canonical.digest(versions)
        if digest != live.versions_digest:  # WIRE-9: the full map only when it changed
            if await self._send(sock, Versions(msg_id=self._ids.next(), session_id=live.session_id,
                                               versions=versions, digest=digest)):
                live.versions_digest = digest
        refs, refs_digest = self._refs.current()
        if refs_digest != live.refs_sent:  # WIRE-9: the full report only when it changed
            await self._send_refs(sock, live, refs, refs_digest)
        ident = self._catalog.identity()
        live.beat_seq += 1
        beat = Heartbeat(msg_id=self._ids.next(), session_id=live.session_id, seq=live.beat_seq,
                         catalog_seq=ident.seq, catalog_digest=ident.digest, versions_digest=digest,
                         refs_digest=refs_digest, storage=host.storage(self._cfg.agent.state_dir),
                         mem_free=host.mem_free(), sandboxes=self._info.sandboxes())
        if await self._send(sock, beat):
            self.counters["heartbeat"] += 1

    async def _on_ack(self, sock: zmq.asyncio.Socket, live: _Live, ack: HeartbeatAck) -> None:
        if ack.interval is not None and ack.interval / 1000 != live.interval:
            last_beat = live.next_beat - live.interval
            live.interval = ack.interval / 1000
            live.liveness = self._liveness(live.interval)
            live.next_beat = last_beat + live.interval
            log.info("heartbeat interval now %gs, liveness %gs", live.interval, live.liveness)
        for want in ack.wants or ():
            if want == "catalog":
                await self._send_catalog(sock, live)
            elif want == "versions":
                versions = await self._current_versions()
                digest = canonical.digest(versions)
                if await self._send(sock, Versions(msg_id=self._ids.next(), session_id=live.session_id,
                                                   versions=versions, digest=digest)):
                    live.versions_digest = digest
            elif want == "refs":  # the complete report, asked for (SNAP-19, SNAP-20)
                await self._send_refs(sock, live, *self._refs.current())

    async def _send_refs(self, sock: zmq.asyncio.Socket, live: _Live, refs: list[dict[str, Any]],
                         digest: str) -> None:
        if await self._send(sock, RuntimeRefs(msg_id=self._ids.next(), session_id=live.session_id,
                                              refs=refs, digest=digest)):
            live.refs_sent = digest
            self.counters["runtime_refs"] += 1

    async def _send_catalog(self, sock: zmq.asyncio.Socket, live: _Live) -> None:
        """CAT-5: pages of ≤ page_size entries, all tagged with the snapshot's (epoch, seq);
        deltas continue from that seq, after the last page."""
        async with live.catalog_lock:
            snap = self._feed.snapshot()
            live.lost_logged = False
            pages = list(snap.pages(self._page_size))
            for number, entries in enumerate(pages):
                await self._send(sock, CatalogSnapshot(
                    msg_id=self._ids.next(), session_id=live.session_id, epoch=snap.identity.epoch,
                    seq=snap.identity.seq, page=number, last=number == len(pages) - 1, entries=entries,
                    digest=snap.identity.digest))
        self.counters["catalog_snapshot"] += 1
        log.info("catalog snapshot sent: seq %d, %d entries, %d page(s)",
                 snap.identity.seq, len(snap.entries), len(pages))

    async def _pump_deltas(self, sock: zmq.asyncio.Socket, live: _Live) -> None:
        """CAT-4: after a change, wait DELTA_COALESCE for more, then send them as one delta."""
        assert self._changed is not None
        while True:
            await self._changed.wait()
            await asyncio.sleep(DELTA_COALESCE)
            self._changed.clear()  # a change from now on sets it again and gets its own round
            await self._flush_catalog(sock, live)

    async def _flush_catalog(self, sock: zmq.asyncio.Socket, live: _Live) -> None:
        """Send the changes the coordinator's mirror lacks, if the journal still has them.
        If not (overflow), send nothing: the beats disagree with the mirror and the coordinator
        asks for a snapshot (CAT-5)."""
        async with live.catalog_lock:
            delta = self._feed.pending()
            if delta is None:
                if self._feed.lost and not live.lost_logged:
                    live.lost_logged = True
                    log.info("catalog changes after seq %s are no longer journaled: the coordinator will "
                             "ask for a snapshot", self._feed.cursor)
                return
            msg = CatalogDelta(msg_id=self._ids.next(), session_id=live.session_id, epoch=delta.epoch,
                               from_seq=delta.from_seq, to_seq=delta.to_seq, upserts=delta.upserts,
                               deletes=delta.deletes, digest=delta.digest)
            if await self._send(sock, msg):
                self._feed.sent(delta)
                self.counters["catalog_delta"] += 1
                log.debug("catalog delta sent: seq %d→%d, %d upserts, %d deletes", delta.from_seq,
                          delta.to_seq, len(delta.upserts), len(delta.deletes))

    async def _current_versions(self) -> dict[str, str]:
        if self._versions.due():  # at most every 30 s, or after SIGHUP; QEMU is forked off-loop
            return await asyncio.to_thread(self._versions.refresh)
        return self._versions.get()
