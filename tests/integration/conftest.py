"""Fixtures for the integration tier: a hand-driven coordinator ROUTER and agent processes."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import zmq

from tests.fake_coordinator import Coordinator, Notify
from tests.support import Clock, Cluster, Proc


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    c: zmq.Context[Any] = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
def coord(ctx: zmq.Context[Any]) -> Iterator[Coordinator]:
    c = Coordinator(ctx)
    yield c
    c.close()


@pytest.fixture
def notify() -> Iterator[Notify]:
    n = Notify()
    yield n
    n.close()


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        if p.alive():
            p.kill()


@pytest.fixture
def engine(db_url: str) -> Iterator[Any]:
    """A migrated coordinator database on each backend (``db_url``)."""
    from coordinator.db.engine import ensure_schema, make_engine
    e = make_engine(db_url)
    ensure_schema(e, migrate_now=True)
    yield e
    e.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sqlite_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster on SQLite only, for end-to-end runs that take seconds each: the job and
    template stores they exercise are tested on SQLite and PostgreSQL in test_job_store and
    test_job_runner."""
    c = Cluster(root=tmp_path, db_url=f"sqlite:///{tmp_path}/coordinator.db")
    try:
        yield c
    finally:
        c.stop()
