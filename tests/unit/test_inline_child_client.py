"""InlineChildClient (``pipeserve-router --inline-children``): a child stage routed in the
same process answers with the statuses a gRPC call to its router would give."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from services.common.errors import DeadlineMissed, Unavailable
from services.gen import pipeserve_pb2 as pb
from services.router.clients import InlineChildClient
from services.router.core import CallFailed


class _Core:
    def __init__(self, behave) -> None:
        self.behave = behave
        self.plan = SimpleNamespace(version=7)
        self.calls = []

    async def route(self, request_id, deadline_s, queries, upstream_path):
        self.calls.append((request_id, deadline_s, [q.query_id for q in queries], upstream_path))
        return await self.behave(queries)


class _Remote:
    def __init__(self) -> None:
        self.calls = []

    async def route(self, task, request, timeout_s):
        self.calls.append(task)
        return "remote answer"


def _request(n: int = 2) -> pb.RouteRequest:
    return pb.RouteRequest(request_id="r1", deadline_unix_s=123.0, upstream_path="a:v",
                           queries=[pb.Query(query_id=f"q.{i}", payload=b"x") for i in range(n)])


def _run(client, task="b", request=None, timeout_s=5.0):
    return asyncio.run(client.route(task, request or _request(), timeout_s))


def test_a_local_child_is_called_directly_with_the_request_fields():
    async def ok(queries):
        return [pb.QueryResult(query_id=q.query_id, status=pb.OK, task="b") for q in queries]
    core, remote = _Core(ok), _Remote()
    resp = _run(InlineChildClient({"b": core}, remote))
    assert [r.query_id for r in resp.results] == ["q.0", "q.1"] and resp.plan_version == 7
    assert core.calls == [("r1", 123.0, ["q.0", "q.1"], "a:v")] and remote.calls == []


def test_a_task_not_served_here_goes_to_its_router():
    remote = _Remote()
    assert _run(InlineChildClient({"b": _Core(None)}, remote), task="c") == "remote answer"
    assert remote.calls == ["c"]


@pytest.mark.parametrize("error, status", [(Unavailable("no plan yet"), pb.UNAVAILABLE),
                                           (DeadlineMissed("too late"), pb.DROPPED_DEADLINE)])
def test_a_serving_error_gets_the_status_its_grpc_code_would_give(error, status):
    async def fail(queries):
        raise error
    with pytest.raises(CallFailed) as info:
        _run(InlineChildClient({"b": _Core(fail)}, _Remote()))
    assert info.value.status == status and str(error) in info.value.message


def test_a_child_that_outlives_the_timeout_is_dropped_on_deadline():
    async def hang(queries):
        await asyncio.Event().wait()
    with pytest.raises(CallFailed) as info:
        _run(InlineChildClient({"b": _Core(hang)}, _Remote()), timeout_s=0.01)
    assert info.value.status == pb.DROPPED_DEADLINE


def test_a_bug_in_the_child_is_internal_and_its_text_stays_in_the_log():
    async def bug(queries):
        raise KeyError("secret internals")
    with pytest.raises(CallFailed) as info:
        _run(InlineChildClient({"b": _Core(bug)}, _Remote()))
    assert info.value.status == pb.INTERNAL and "secret" not in info.value.message


def test_an_empty_request_is_an_internal_error_not_a_call():
    core = _Core(None)
    with pytest.raises(CallFailed) as info:
        _run(InlineChildClient({"b": core}, _Remote()), request=_request(0))
    assert info.value.status == pb.INTERNAL and core.calls == []
