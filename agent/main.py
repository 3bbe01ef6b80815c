"""``tc-agent [--config FILE] [--set section.key=value ...]`` (SPEC CFG-2, GC-14, SEC-1).

Start order is GC-14's: state dir → catalog → startup reconcile → build preflight → blob
endpoint bound → READY=1 → only then the session (HELLO). Exit codes: 0 after SIGTERM or
SIGINT, 2 for a configuration error (nothing started), 1 when start-up or a core task fails
(systemd restarts the unit).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from typing import Any

import zmq
import zmq.asyncio

from protocol import ids
from protocol.config import ConfigError
from protocol.errors import TCError
from protocol import keys as curve_keys
from protocol.daemon import (check_plain_tcp, install_signal_handlers, sd_notify, setup_logging,
                             watchdog_interval, watchdog_loop)
from protocol.messages import ENDPOINT, LABELS, VERSIONS
from protocol.schema import SchemaError, Str

from . import facts as host
from .blobs import BlobServer, advertised
from .catalog import Catalog
from .config import AgentConfig, load_config
from .grants import GrantTable
from .image.service import ImageService
from .session import HelloInfo, Session
from .tasks import TaskRunner
from .replicas import Replicas
from .runtime import make_driver
from .runtime.sandboxes import SandboxService
from .storage import StorageProbe
from .transfer import TransferService

log = logging.getLogger("agent")
PROGRAM = "tc-agent"
ADDRESS = Str(64, min_len=1)  # Hello.address


class StartupError(Exception):
    """Start-up could not complete (state dir, catalog or blob endpoint); the message says what."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROGRAM, description="templatecenter host agent")
    p.add_argument("--config", metavar="FILE", help="TOML configuration (default: built-in defaults)")
    p.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   help="override one configuration key (repeatable)")
    return p.parse_args(argv)


def check_config(cfg: AgentConfig) -> None:
    """Refuse, before anything starts, what would otherwise fail later at HELLO or at bind."""
    if not ids.valid("node", cfg.node_id):
        raise ConfigError(f"agent.node_id: the host name {cfg.node_id!r} is not a DNS label (CONV-1); "
                          "set agent.node_id")
    # The message validators are the authority on what HELLO may carry.
    checks: list[tuple[Any, Any, str]] = [(ADDRESS, cfg.agent.address or "127.0.0.1", "agent.address"),
                                          (LABELS, cfg.agent.labels, "agent.labels"),
                                          (VERSIONS, cfg.agent.versions, "agent.versions"),
                                          (ENDPOINT, cfg.agent.blob_endpoint, "agent.blob_endpoint")]
    checks += [(ENDPOINT, ep, "agent.coordinators") for ep in cfg.agent.coordinators]
    for validator, value, key in checks:
        try:
            validator(value, key)
        except SchemaError as exc:
            raise ConfigError(f"invalid value for {exc.field}: {exc.reason}") from None
    check_plain_tcp([*cfg.agent.coordinators, cfg.agent.blob_endpoint], cfg.security.curve)
    if cfg.security.curve:
        pins = cfg.agent.coordinator_keys
        if not pins:
            raise ConfigError("agent.coordinator_keys: with security.curve = true the agent must pin the "
                              "coordinator's public key (SEC-2); it is in the coordinator's "
                              "<state_dir>/keys/coordinator.key and its start-up log")
        bad = [k for k in pins if not curve_keys.valid_public(k)]
        if bad:
            raise ConfigError(f"agent.coordinator_keys: {bad[0][:12]}… is not a 40-character z85 public key")
        if len(pins) not in (1, len(cfg.agent.coordinators)):
            raise ConfigError("agent.coordinator_keys: give one key for all coordinators, or one per "
                              "agent.coordinators entry, in the same order")


def prepare_state_dir(path: str) -> None:
    """The state dir holds the catalog and (later) keys and artifacts: root-only, 0700."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)  # makedirs' mode is filtered by the umask, and the dir may pre-exist
    except OSError as exc:
        raise StartupError(f"cannot prepare agent.state_dir {path}: {exc}") from None


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.versions = host.VersionsCache(cfg)
        self._stop = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        install_signal_handlers(loop, self._on_stop, self._on_reload)
        cfg = self.cfg
        started_ms = int(time.time() * 1000)
        prepare_state_dir(cfg.agent.state_dir)
        try:
            catalog = Catalog.open(cfg.agent.state_dir)
        except Exception as exc:  # noqa: BLE001 — sqlite3 raises several types; all mean "no catalog"
            raise StartupError(f"cannot open the catalog in {cfg.agent.state_dir}: {exc}") from None
        ctx = zmq.asyncio.Context()
        blobs: BlobServer | None = None
        try:
            reconcile = catalog.reconcile(cfg.agent.state_dir)  # CAT-3: before HELLO, deletes nothing
            ident = catalog.identity()
            log.info("catalog epoch %s seq %d; reconcile: %d missing, %d orphans", ident.epoch, ident.seq,
                     len(reconcile["missing"]), len(reconcile["orphans"]))
            caps = await asyncio.to_thread(host.capabilities, cfg)
            driver = make_driver(cfg)
            try:
                await asyncio.to_thread(driver.start)  # RT-3 canary, RT-5 initramfs
            except TCError as exc:  # a forced accelerator that does not work stops the agent (RT-3)
                raise StartupError(f"runtime driver: {exc.message}") from None
            caps["sandbox"] = caps["sandbox"] and driver.sandbox
            self.versions.runtime = driver.versions()  # RT-6, under agent.versions overrides
            address = await asyncio.to_thread(host.node_address, cfg)
            versions = await asyncio.to_thread(self.versions.refresh)
            log.info("capabilities %s; versions %s; address %s", caps, versions, address)
            pair = None
            if cfg.security.curve:
                pair = curve_keys.load_or_create(os.path.join(cfg.agent.state_dir, "keys"), "agent")
                log.info("CURVE on: this node's key %s (public %s)", curve_keys.fingerprint(pair.public),
                         pair.public)
            grants = GrantTable()
            blobs = BlobServer(ctx, cfg, pair, catalog=catalog, grants=grants)
            try:
                bound = blobs.bind()
            except zmq.ZMQError as exc:
                raise StartupError(f"cannot bind agent.blob_endpoint {cfg.agent.blob_endpoint}: {exc}") from None
            blob_endpoint = advertised(bound, address)
            log.info("blob endpoint bound at %s (advertised %s)", bound, blob_endpoint)
            sd_notify(f"READY=1\nSTATUS=blob endpoint {blob_endpoint}; connecting to the coordinator")
            info = HelloInfo(node_id=cfg.node_id, blob_endpoint=blob_endpoint, labels=dict(cfg.agent.labels),
                             capabilities=caps, reconcile=reconcile, boot_ms=started_ms,
                             facts=lambda: {**host.collect_facts(cfg), **driver.facts()})
            images = ImageService(cfg, catalog)
            leftovers = await asyncio.to_thread(images.recover)
            if leftovers:
                log.info("removed build leftovers of an earlier run: %s", ", ".join(leftovers[:10]))
            # Fetches run in worker threads with plain sockets on the same libzmq context.
            transfers = TransferService(cfg, catalog, grants, zmq.Context.shadow(ctx.underlying), pair, images.store)
            sandboxes = SandboxService(cfg, catalog, driver, self.versions.get,
                                       lambda: {"cpu_flags_hash": host.cpu_flags_hash(), **driver.facts()})
            await asyncio.to_thread(sandboxes.reattach)  # RT-15/RT-16, before HELLO (GC-14)
            info.sandboxes = sandboxes.running
            sandboxes.start_monitor()
            runner = TaskRunner(catalog, {**images.handlers(), **transfers.handlers(),
                                          **Replicas(catalog, sandboxes.remove_replica_files).handlers(),
                                          **StorageProbe(cfg).handlers(), **sandboxes.handlers()},
                                progress_interval=float(cfg.task.progress_interval),
                                retention=float(cfg.task.record_retention))
            pruned = runner.prune()
            if pruned:
                log.info("pruned %d task records older than %gs (CAT-7)", pruned, float(cfg.task.record_retention))
            session = Session(cfg, ctx, catalog, self.versions, info, pair=pair, tasks=runner, transfer=transfers)
            try:
                return await self._supervise(session, blobs)
            finally:
                sandboxes.stop()
                await runner.close()
        finally:
            if blobs is not None:
                blobs.close(int(cfg.zmq.linger * 1000))
            ctx.term()  # every socket is closed by now; waits at most zmq.linger
            catalog.close()

    async def _supervise(self, session: Session, blobs: BlobServer) -> int:
        """Run the core tasks until a stop signal (0) or until one of them dies (1)."""
        tasks = {asyncio.create_task(session.run(), name="session"),
                 asyncio.create_task(blobs.serve(), name="blobs")}
        interval = watchdog_interval()
        if interval is not None:
            tasks.add(asyncio.create_task(watchdog_loop(interval), name="watchdog"))
            log.info("systemd watchdog: pinging every %gs", interval)
        stopper = asyncio.create_task(self._stop.wait(), name="stop")
        done, _ = await asyncio.wait({stopper, *tasks}, return_when=asyncio.FIRST_COMPLETED)
        rc = 0
        for task in done - {stopper}:
            exc = task.exception()
            log.error("%s task ended unexpectedly: %r", task.get_name(), exc, exc_info=exc)
            rc = 1
        sd_notify("STOPPING=1")
        for task in [stopper, *tasks]:
            task.cancel()
        await asyncio.gather(stopper, *tasks, return_exceptions=True)
        log.info("stopped; session counters %s; blob counters %s",
                 dict(session.counters), dict(blobs.counters))
        return rc

    def _on_stop(self, signame: str) -> None:
        log.info("%s received: stopping", signame)
        self._stop.set()

    def _on_reload(self) -> None:
        log.info("SIGHUP received: versions are recomputed before the next heartbeat")
        self.versions.invalidate()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        check_config(cfg)
    except ConfigError as exc:
        print(f"{PROGRAM}: config error: {exc}", file=sys.stderr)
        return 2
    setup_logging(PROGRAM, cfg.node_id)
    try:
        return asyncio.run(Agent(cfg).run())
    except StartupError as exc:
        log.error("start-up failed: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
