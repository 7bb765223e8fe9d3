"""Unit tests run pure code: opening a network connection here is a bug in the test."""
from __future__ import annotations

import socket

import pytest


class SocketForbidden(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _no_sockets(monkeypatch):
    def guard(*args, **kwargs):
        raise SocketForbidden("unit tests must not open network connections; move this to tests/integration")

    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket.socket, "connect_ex", guard)
    monkeypatch.setattr(socket.socket, "bind", guard)
    monkeypatch.setattr(socket, "create_connection", guard)
