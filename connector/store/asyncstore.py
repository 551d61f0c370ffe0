"""Runs a store's methods in a dedicated thread, for the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from connector.errors import StoreUnavailable
from connector.store._engine import fault_of
from connector.store.abc import Store

P = ParamSpec("P")
T = TypeVar("T")


class AsyncStore:
    """Runs a :class:`Store`'s methods in one dedicated thread, for the event loop."""

    def __init__(self, store: Store, *, name: str = "store") -> None:
        self.store = store
        # the thread keeps its connection between calls where the store allows it
        hold = getattr(store, "hold_connection", None)
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name, initializer=hold
        )
        self._owner = True

    def lane(self, name: str) -> AsyncStore:
        """The same store through a thread of its own: long calls in one lane (planning a
        batch) do not hold up short ones in another (claims). Closing a lane leaves the
        store open."""
        other = AsyncStore(self.store, name=name)
        other._owner = False
        return other

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))
        except SQLAlchemyError as exc:
            raise StoreUnavailable(
                f"the store failed ({exc.__class__.__name__})",
                reason=fault_of(exc) or "store unavailable",
            ) from None

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._owner:
            self.store.close()
