"""Slots: size 1, newest wins, drops counted, awaitable across threads."""

from __future__ import annotations

import asyncio
import threading

import pytest

from livediff.engine.slot import AsyncSlot, Slot, SlotClosedError


def test_put_replaces_the_waiting_item_and_counts_the_drop() -> None:
    dropped: list[int] = []
    slot: Slot[int] = Slot(on_drop=dropped.append)
    slot.put(1)
    slot.put(2)
    slot.put(3)
    assert slot.take() == 3
    assert slot.take() is None
    assert slot.dropped == 2
    assert dropped == [1, 2]


def test_closed_slot_refuses_items() -> None:
    slot: Slot[int] = Slot()
    slot.put(1)
    slot.close()
    assert slot.take() is None
    assert slot.put(2) is False
    assert not slot.ready()


def test_on_put_is_called_for_every_item() -> None:
    calls: list[None] = []
    slot: Slot[str] = Slot(on_put=lambda: calls.append(None))
    slot.put("a")
    slot.put("b")
    assert len(calls) == 2


async def test_async_get_wakes_for_a_put_from_another_thread() -> None:
    slot: AsyncSlot[int] = AsyncSlot(asyncio.get_running_loop())
    getter = asyncio.create_task(slot.get())
    await asyncio.sleep(0.01)
    assert not getter.done()
    thread = threading.Thread(target=slot.put, args=(7,))
    thread.start()
    thread.join()
    assert await asyncio.wait_for(getter, 5) == 7


async def test_async_get_returns_only_the_newest_of_a_burst() -> None:
    slot: AsyncSlot[int] = AsyncSlot(asyncio.get_running_loop())
    for value in range(10):
        slot.put(value)
    assert await slot.get() == 9
    assert slot.dropped == 9


async def test_closing_wakes_a_waiting_consumer() -> None:
    slot: AsyncSlot[int] = AsyncSlot(asyncio.get_running_loop())
    getter = asyncio.create_task(slot.get())
    await asyncio.sleep(0.01)
    slot.close()
    with pytest.raises(SlotClosedError):
        await asyncio.wait_for(getter, 5)
