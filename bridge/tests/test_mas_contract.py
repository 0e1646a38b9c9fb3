"""The MAS contract as settings: a real HTTP MAS of another shape, refusals logged without user text,
and the MAS state `unknown` until the first call or probe."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from conftest import base_settings, free_port
from personaplex_bridge.config import ConfigError, load_settings

SECRET_WORDS = "my-bank-pin-is-4711"

# The other shape: {"conversation":{"id"},"message"} in, {"data":{"answer","tools"},"trace"} out.
REQUEST_MAP = "session_id=conversation.id,text=message,source="
REPLY_MAP = "response=data.answer,tool_calls=data.tools,agent_activity=trace"


@dataclass
class OtherShapeMas:
    """A MAS that validates its own request shape like FastAPI does (422, echoing the input)."""

    port: int = 0
    requests: list[Any] = field(default_factory=list)
    health_status: int = 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v2/converse"

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ready"

    async def converse(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        message = body.get("message") if isinstance(body, dict) else None
        conversation = body.get("conversation") if isinstance(body, dict) else None
        if not isinstance(message, str) or not isinstance(conversation, dict):
            missing = [name for name in ("message", "conversation") if name not in body]
            detail = [
                {"type": "missing", "loc": ["body", name], "msg": "Field required", "input": body}
                for name in missing
            ]
            return web.json_response({"detail": detail}, status=422)
        return web.json_response(
            {
                "data": {"answer": f"heard {message}", "tools": [{"name": "search"}]},
                "trace": [{"agent": "router", "conversation": conversation["id"]}],
                "usage": {"tokens": 7},
            }
        )

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=self.health_status)


@pytest.fixture
async def other_mas() -> AsyncIterator[OtherShapeMas]:
    stand_in = OtherShapeMas()
    app = web.Application()
    app.router.add_post("/v2/converse", stand_in.converse)
    app.router.add_get("/ready", stand_in.ready)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stand_in.port = runner.addresses[0][1]
    try:
        yield stand_in
    finally:
        await runner.cleanup()


async def wait_status(
    rb: Any, check: Callable[[dict[str, Any]], bool], timeout: float = 5.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = await rb.status()
        if check(status):
            return status
        assert time.monotonic() < deadline, status["mas"]
        await asyncio.sleep(0.05)


def mapped(url: str, **overrides: Any) -> Any:
    s = load_settings(
        {
            "BRIDGE_MAS_URL": url,
            "BRIDGE_MAS_REQUEST_FIELDS": REQUEST_MAP,
            "BRIDGE_MAS_REPLY_FIELDS": REPLY_MAP,
        }
    )
    return base_settings(
        url, mas_request_fields=s.mas_request_fields, mas_reply_fields=s.mas_reply_fields, **overrides
    )


async def test_other_shape_is_refused_by_default_and_logged_without_user_text(
    other_mas, start_bridge, caplog
):
    caplog.set_level(logging.INFO, logger="personaplex_bridge")  # user text is logged at debug only
    rb = await start_bridge(base_settings(other_mas.url))
    client = await rb.connect()
    await client.send({"type": "text", "text": SECRET_WORDS})
    err = await client.expect("error")
    assert err["code"] == "mas_bad_reply"
    assert "HTTP 422" in err["message"]
    refusals = [r.getMessage() for r in caplog.records if "MAS reply refused" in r.getMessage()]
    assert len(refusals) == 1
    # The log names the fields sent and what the MAS wanted, not the echoed input.
    assert "session_id, source, text" in refusals[0]
    assert "body.message: Field required" in refusals[0]
    assert "body.conversation: Field required" in refusals[0]
    assert SECRET_WORDS not in caplog.text
    assert (await rb.status())["mas"]["state"] == "down"
    await client.close()


async def test_other_shape_mapped_by_the_settings(other_mas, start_bridge):
    rb = await start_bridge(mapped(other_mas.url))
    client = await rb.connect()
    await client.send({"type": "text", "text": "hello there"})
    reply = await client.expect("mas_response")
    assert other_mas.requests == [{"conversation": {"id": client.ready["session"]}, "message": "hello there"}]
    assert reply["text"] == "heard hello there"
    assert reply["tool_calls"] == [{"name": "search"}]
    assert reply["agent_activity"] == [{"agent": "router", "conversation": client.ready["session"]}]
    assert reply["memory"] == []
    assert reply["extra"] == {"usage": {"tokens": 7}}
    status = await rb.status()
    assert status["mas"]["state"] == "up"
    assert status["mas"]["contract"] == {
        "request": {"session_id": "conversation.id", "text": "message", "source": None},
        "reply": {
            "response": "data.answer",
            "tool_calls": "data.tools",
            "agent_activity": "trace",
            "memory": "memory",
        },
    }
    await client.close()


async def test_reply_without_its_text_is_logged_with_keys_only(mas, start_bridge, caplog):
    caplog.set_level(logging.INFO, logger="personaplex_bridge")  # user text is logged at debug only
    mas.mode = "ok"  # answers {"response": "echo: TEXT", ...}: the mapping looks elsewhere
    rb = await start_bridge(base_settings(mas.url, mas_reply_fields=(("response", "data.answer"),)))
    client = await rb.connect()
    await client.send({"type": "text", "text": SECRET_WORDS})
    err = await client.expect("error")
    assert err["code"] == "mas_bad_reply"
    assert "'data.answer'" in err["message"]
    refusal = next(r.getMessage() for r in caplog.records if "MAS reply refused" in r.getMessage())
    assert "its keys: response, tool_calls, agent_activity, memory, model, latency_ms" in refusal
    assert "BRIDGE_MAS_REPLY_FIELDS" in refusal
    assert SECRET_WORDS not in caplog.text
    await client.close()


async def test_status_is_unknown_until_the_first_call(mas, start_bridge):
    rb = await start_bridge(base_settings(mas.url, probe_interval_s=30.0))
    status = await rb.status()
    assert (status["mas"]["state"], status["mas"]["reason"]) == ("unknown", "no call yet")
    assert "bridge_mas_up 0" in await rb.metrics()
    client = await rb.connect()
    assert client.ready["mas"] == "unknown"
    await client.send({"type": "text", "text": "hi"})
    await client.expect("mas_response")
    assert (await rb.status())["mas"]["state"] == "up"
    assert "bridge_mas_up 1" in await rb.metrics()
    await client.close()


async def test_status_unknown_then_down_when_the_mas_refuses_connections(start_bridge):
    url = f"http://127.0.0.1:{free_port()}/api/chat"
    rb = await start_bridge(base_settings(url, probe_interval_s=30.0))
    assert (await rb.status())["mas"]["state"] == "unknown"
    client = await rb.connect()
    await client.send({"type": "text", "text": "hi"})
    assert (await client.expect("error"))["code"] == "mas_unavailable"
    assert (await rb.status())["mas"]["state"] == "down"
    await client.close()


async def test_health_probe_at_start_decides_the_state(other_mas, start_bridge):
    # With a health URL the bridge probes before it listens: never "unknown" from the first /status.
    other_mas.health_status = 503
    rb = await start_bridge(mapped(other_mas.url, mas_health_url=other_mas.health_url, probe_interval_s=0.3))
    down = await rb.status()
    assert (down["mas"]["state"], down["mas"]["reason"]) == ("down", "health check answered HTTP 503")
    other_mas.health_status = 200
    await wait_status(rb, lambda s: s["mas"]["state"] == "up")


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("BRIDGE_MAS_REQUEST_FIELDS", "session=conv", "'session' is not one of session_id, text, source"),
        ("BRIDGE_MAS_REQUEST_FIELDS", "text=", "'text' cannot be left out"),
        ("BRIDGE_MAS_REQUEST_FIELDS", "text", "each item must look like NAME=FIELD"),
        ("BRIDGE_MAS_REQUEST_FIELDS", "text=a,session_id=a.b", "'a' and 'a.b' overlap"),
        ("BRIDGE_MAS_REQUEST_FIELDS", "text=source", "two fields map to 'source'"),
        ("BRIDGE_MAS_REPLY_FIELDS", "response=data..answer", "is not a field name or a dotted path"),
        ("BRIDGE_MAS_REPLY_FIELDS", "memory=x,memory=y", "maps 'memory' twice"),
    ],
)
def test_bad_mappings_name_the_variable(variable, value, problem):
    with pytest.raises(ConfigError) as info:
        load_settings({"BRIDGE_MAS_URL": "http://mas/api/chat", variable: value})
    assert str(info.value).startswith(variable + ": ")
    assert problem in str(info.value)


def test_partial_mapping_keeps_the_other_names_and_flags_win():
    s = load_settings(
        {"BRIDGE_MAS_URL": "http://mas/api/chat", "BRIDGE_MAS_REPLY_FIELDS": "response=answer"},
        ["--mas-request-fields", "text=message"],
    )
    assert s.mas_request_fields == (("text", "message"),)
    assert s.mas_reply_fields == (("response", "answer"),)
    assert s.redacted()["mas_request_fields"] == {"text": "message"}
