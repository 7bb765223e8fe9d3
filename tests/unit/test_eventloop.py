"""PIPESERVE_EVENT_LOOP: the services run on the loop it names, and a wrong value or a
missing uvloop is a clear error before anything starts."""
from __future__ import annotations

import asyncio
import sys

import pytest

from services.common.eventloop import ENV, EventLoopError, loop_kind, run_service


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_the_default_is_asyncio(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert loop_kind() == "asyncio"
    assert run_service(_loop_module()).startswith("asyncio")


def test_uvloop_runs_the_service_on_uvloop(monkeypatch):
    monkeypatch.setenv(ENV, "UVloop ")
    assert loop_kind() == "uvloop"
    assert run_service(_loop_module()).startswith("uvloop")


def test_an_unknown_loop_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv(ENV, "trio")
    coro = _loop_module()
    with pytest.raises(EventLoopError, match="'trio' is not a known event loop; use one of asyncio, uvloop"):
        run_service(coro)
    assert coro.cr_frame is None   # closed, not left un-awaited


def test_uvloop_asked_for_and_missing_says_how_to_install_it(monkeypatch):
    monkeypatch.setenv(ENV, "uvloop")
    monkeypatch.setitem(sys.modules, "uvloop", None)   # import uvloop raises ImportError
    with pytest.raises(EventLoopError, match=r"pip install 'pipeserve\[uvloop\]'"):
        run_service(_loop_module())
