"""SNAP-7: the per-resource locks of snapshot operations (pure asyncio, no database)."""
from __future__ import annotations

import asyncio

from coordinator.snapshots.service import KeyedLocks


def test_one_holder_per_key_and_no_leftovers() -> None:
    """Two operations on one sandbox run one after the other; one on another sandbox runs
    alongside; the lock table is empty afterwards (no growth with the number of resources)."""
    locks = KeyedLocks()
    order: list[str] = []

    async def op(name: str, *keys: str) -> None:
        async with locks.hold(*keys):
            order.append(f"{name}+")
            await asyncio.sleep(0)  # let the others try to enter
            await asyncio.sleep(0)
            order.append(f"{name}-")

    async def main() -> None:
        await asyncio.gather(op("a", "sbx:1", "req:a"), op("b", "sbx:1", "snap:9", "req:b"), op("c", "sbx:2", "req:c"))

    asyncio.run(main())
    assert order.index("a-") < order.index("b+")  # same sandbox: serial
    assert order.index("c+") < order.index("a-")  # another sandbox: not blocked
    assert locks._locks == {}


def test_release_on_error() -> None:
    locks = KeyedLocks()

    async def main() -> None:
        try:
            async with locks.hold("sbx:1", "req:x"):
                raise ValueError("refused")
        except ValueError:
            pass
        async with locks.hold("sbx:1"):  # not left held
            pass

    asyncio.run(asyncio.wait_for(main(), 5))
    assert locks._locks == {}
