"""Stand-ins for Serve deployment handles, so servers and the ingress run without Ray (isolated units).

``FakeHandle(target)`` forwards ``handle.method.remote(...)`` to ``target.method(...)`` and answers
both ways Serve's responses are used: awaited (in async code) or ``.result()`` (from worker threads).
``handle.options(stream=True)`` returns streams that are async iterators (awaited by the ingress) or
plain iterators (iterated by the device tier's worker threads), each with ``cancel()``.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Iterator
from typing import Any


def _run(value: Any) -> Any:
    return asyncio.run(value) if inspect.isawaitable(value) else value


class FakeResponse:
    def __init__(self, call: Any) -> None:
        self._call = call

    def __await__(self) -> Any:
        async def wait() -> Any:
            value = self._call()
            return await value if inspect.isawaitable(value) else value

        return wait().__await__()

    def result(self, timeout_s: float | None = None) -> Any:
        return self._call()


class FakeStream:
    def __init__(self, agen: AsyncIterator[Any]) -> None:
        self._agen = agen
        self._loop: asyncio.AbstractEventLoop | None = None
        self.cancelled = False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Any:
        return await self._agen.__anext__()

    def __iter__(self) -> Iterator[Any]:
        self._loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    yield self._loop.run_until_complete(self._agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._loop.close()

    def cancel(self) -> None:
        self.cancelled = True


class _Method:
    def __init__(self, target: Any, name: str, stream: bool) -> None:
        self._fn = getattr(target, name)
        self._stream = stream

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        if self._stream:
            return FakeStream(self._fn(*args, **kwargs))
        # The call is dispatched now, as Serve's is: a fire-and-forget call runs even if nobody waits.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if inspect.iscoroutinefunction(self._fn) and loop is not None:
            task = loop.create_task(self._fn(*args, **kwargs))
            return FakeResponse(lambda: task)
        value = _run(self._fn(*args, **kwargs))  # from a worker thread: to completion, in a loop of its own
        return FakeResponse(lambda: value)


class FakeHandle:
    def __init__(self, target: Any, stream: bool = False) -> None:
        self._target = target
        self._stream = stream
        self.calls: list[str] = []

    def options(self, stream: bool = False, **_: Any) -> FakeHandle:
        handle = FakeHandle(self._target, stream)
        handle.calls = self.calls
        return handle

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        self.calls.append(name)
        return _Method(self._target, name, self._stream)
