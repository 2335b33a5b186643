"""Taking an anyio lock or limiter without a trip round the event loop when it is free."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio


@contextlib.asynccontextmanager
async def held(lock: anyio.Lock | anyio.CapacityLimiter) -> AsyncIterator[None]:
    """Hold ``lock``. A free one is taken at once: anyio's ``acquire`` yields to the event loop even
    then (a checkpoint), which on a dispatch's path costs a loop iteration each time."""
    try:
        lock.acquire_nowait()
    except anyio.WouldBlock:
        await lock.acquire()
    try:
        yield
    finally:
        lock.release()
