"""Fixtures shared by every tier: the PostgreSQL cluster and the database URL matrix.

Database tests take ``db_url`` and run twice: on SQLite and on a throwaway PostgreSQL
cluster this session starts (HA-1: same migrations on both).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from .pg import PgCluster
from .support import Cluster

# The loopback registry fixtures (registry, registry_factory) for the image tests (issue 4).
pytest_plugins = ["tests.registry"]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/coordinator.db"
    return request.getfixturevalue("pg_cluster").new_database()


@pytest.fixture
def cluster(tmp_path: Path, db_url: str) -> Iterator[Cluster]:
    c = Cluster(root=tmp_path, db_url=db_url)
    try:
        yield c
    finally:
        c.stop()
