"""``voice-engine selftest --say --url URL`` (or ``--config CONFIG --running``): through a running engine.

See :mod:`voice_engine.selftest` for the command. Loads no model: everything goes through the engine's
own routes, as a client would (``/status``, ``/api/chat`` with the say channel, ``/api/asr-streaming``).

Per pacing policy, one ``/api/chat`` session (``say_pacing=POLICY&say_after=hold``): after the ``0x00``
handshake, silent user frames go out as Ogg/Opus, at most :data:`AHEAD` frames ahead of the audio that
came back (the engine steps once per frame; the bound keeps its per-session queues short, far below
their limit of 256 outputs), so the engine steps the session as fast as it can, not in real time. Each
sentence goes as ``0x02``; its clip is the decoded ``0x01`` audio from the step of its ``say_start``
through :data:`~voice_engine.selftest_report.TAIL_FRAMES` steps after its ``say_end``; the next sentence
goes once the clip is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import sphn

from .selftest_report import (
    FRAME,
    SAMPLE_RATE,
    TAIL_FRAMES,
    SelftestError,
    Spoken,
    UsageError,
    tiny_of_dim,
)

CHAT_ROUTE = "/api/chat"
AHEAD = 8  # user frames sent and not yet answered with audio
FULL_RETRY_S = 10.0  # how long a full engine (HTTP 503) is retried
STEPS_PER_WORD = 40  # the step budget of a sentence, per word (the defaults need under 20)
SILENCE = np.zeros(FRAME, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class Target:
    """A running engine, from its ``/status``."""

    base: str
    key: str
    chat: dict[str, Any]  # the chat module's /status entry
    has_asr: bool
    tiny: bool | None  # None: its chat model's config.json is not readable here


@dataclasses.dataclass(frozen=True)
class Prompts:
    voice: str = ""
    text: str | None = None  # None: the module's default text prompt
    seed: int = 1


def _tiny(model_dir: str) -> bool | None:
    """Whether the chat model is a tiny test model, from its ``config.json`` when this machine can
    read it (the engine on this host); None otherwise."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        return tiny_of_dim(int(config["dim"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


async def discover(http: aiohttp.ClientSession, base: str, key: str, timeout_s: float) -> Target:
    """The engine at ``base``: its chat module (a :class:`UsageError` when it is unreachable or has
    none) and whether it has an asr module."""
    try:
        async with http.get(base + "/status", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                raise UsageError(f"{base}/status answered HTTP {resp.status}: is this a voice engine?")
            status = await resp.json(content_type=None)
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        raise UsageError(f"cannot reach the engine at {base}: {reason}") from None
    modules = status.get("modules") if isinstance(status, dict) else None
    if not isinstance(modules, dict):
        raise UsageError(f"{base}/status has no modules: is this a voice engine?")
    kinds = {name: str(entry.get("kind")) for name, entry in modules.items() if isinstance(entry, dict)}
    chat = [modules[name] for name, kind in kinds.items() if kind == "chat"]
    if not chat:
        served = ", ".join(f"{name} ({kind})" for name, kind in kinds.items()) or "none"
        raise UsageError(f"the engine at {base} has no chat module (its modules: {served})")
    if chat[0].get("failed"):
        raise SelftestError(f"the engine's chat module has failed: {chat[0]['failed']}")
    tiny = _tiny(str(chat[0].get("model_dir", "")))
    return Target(base, key, chat[0], "asr" in kinds.values(), tiny)


async def _refusal(
    http: aiohttp.ClientSession, url: str, params: dict[str, str], key: str, status: int
) -> str:
    """The JSON error of a refused upgrade (the same request, without the upgrade)."""
    try:
        async with http.get(url, params=params, headers={"kyutai-api-key": key}) as resp:
            body = await resp.json(content_type=None)
            return str(body.get("error", body))
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError, AttributeError):
        return f"HTTP {status}"


class _Session:
    """One ``/api/chat`` session: the user frames going out (bounded ahead), the audio coming back."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, timeout_s: float) -> None:
        self.ws = ws
        self.timeout_s = timeout_s
        self.reader = sphn.OpusStreamReader(SAMPLE_RATE)
        self.parts: list[np.ndarray[Any, Any]] = []
        self.offsets: list[int] = []  # the first sample of each audio page
        self.arrived: list[float] = []  # when each audio page arrived
        self.samples = 0
        self.sent = 0
        self.answered = asyncio.Event()

    async def feed(self) -> None:
        """Silent user frames, never more than :data:`AHEAD` ahead of the audio pages received."""
        writer = sphn.OpusStreamWriter(SAMPLE_RATE)
        while True:
            while self.sent - len(self.arrived) >= AHEAD:
                self.answered.clear()
                await self.answered.wait()
            await self.ws.send_bytes(b"\x01" + bytes(writer.append_pcm(SILENCE)))
            self.sent += 1

    async def receive(self, deadline: float) -> tuple[int, bytes]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SelftestError(f"the engine sent nothing useful for {self.timeout_s:g} s")
        try:
            msg = await self.ws.receive(timeout=left)
        except asyncio.TimeoutError:
            raise SelftestError(f"nothing from the engine within {self.timeout_s:g} s") from None
        if msg.type != aiohttp.WSMsgType.BINARY or not msg.data:
            reason = f" ({self.ws.close_code})" if self.ws.close_code is not None else ""
            raise SelftestError(f"the engine closed the session{reason}")
        data = bytes(msg.data)
        if data[0] == 1:
            try:
                pcm = np.asarray(self.reader.append_bytes(data[1:]), dtype=np.float32).reshape(-1)
            except Exception as exc:  # sphn raises plain exceptions with the decoder's message
                raise SelftestError(f"the engine's audio (0x01) is not decodable Ogg/Opus: {exc}") from None
            self.offsets.append(self.samples)
            self.arrived.append(time.monotonic())
            self.parts.append(pcm)
            self.samples += pcm.shape[0]
            self.answered.set()
        elif data[0] == 5:
            raise SelftestError(f"the engine answered with an error: {data[1:].decode(errors='replace')}")
        return data[0], data[1:]

    def audio(self, first_page: int) -> np.ndarray[Any, Any]:
        whole = np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=np.float32)
        start = self.offsets[first_page] if first_page < len(self.offsets) else self.samples
        return whole[start:]

    async def say(self, policy: str, index: int, sentence: str) -> Spoken:
        """``sentence`` as ``0x02``; its clip from the step of ``say_start`` to the tail after ``say_end``."""
        sent_at = time.monotonic()
        await self.ws.send_bytes(b"\x02" + sentence.encode("utf-8"))
        first_page: int | None = None
        forced = dropped = ""
        reason: str | None = None
        tail = TAIL_FRAMES
        deadline = time.monotonic() + self.timeout_s
        # Far more steps than any pacing needs; past them the reply is cancelled, and then given up.
        limit = len(self.arrived) + STEPS_PER_WORD * (len(sentence.split()) + 2)
        cancelled = False
        while tail > 0:
            kind, payload = await self.receive(deadline)
            if kind == 1:
                deadline = time.monotonic() + self.timeout_s
                if reason is not None:
                    tail -= 1
                elif len(self.arrived) > limit and not cancelled:
                    await self.ws.send_bytes(b'\x04{"say": "cancel"}')
                    cancelled, limit = True, limit + STEPS_PER_WORD
                elif len(self.arrived) > limit:
                    raise SelftestError(f"no say_end for {sentence!r} after {limit} steps and a cancel")
                continue
            if kind != 4:
                continue
            try:
                event = json.loads(payload)
            except ValueError:
                continue  # not a say event (metadata the protocol lets the engine send)
            if not isinstance(event, dict):
                continue
            if event.get("type") == "say_start" and first_page is None:
                first_page = max(len(self.arrived) - 1, 0)  # the step that started it sent its audio first
                forced, dropped = str(event.get("text", "")), str(event.get("dropped", ""))
            elif event.get("type") == "say_end" and first_page is not None:
                reason = str(event.get("reason"))
        assert first_page is not None
        pages = len(self.arrived) - first_page
        began = self.arrived[first_page - 1] if first_page > 0 else sent_at
        wall = self.arrived[-1] - began
        return Spoken(policy, index, sentence, forced, dropped, reason, self.audio(first_page), pages, wall)


async def _connect(
    http: aiohttp.ClientSession, target: Target, url: str, params: dict[str, str], full_s: float
) -> aiohttp.ClientWebSocketResponse:
    """The session's websocket. A 503 (every slot taken) is retried for ``full_s`` seconds: the slot of
    the previous policy's session may not be free yet, the moment it closed."""
    deadline = time.monotonic() + full_s
    while True:
        try:
            return await http.ws_connect(
                url,
                params=params,
                headers={"kyutai-api-key": target.key},
                timeout=aiohttp.ClientWSTimeout(ws_close=5),
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 503 and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                continue
            message = await _refusal(http, target.base + CHAT_ROUTE, params, target.key, exc.status)
            error = UsageError if exc.status in (400, 401, 403, 404) else SelftestError
            raise error(
                f"{target.base}{CHAT_ROUTE} refused the session (HTTP {exc.status}): {message}"
            ) from None


async def _speak_policy(
    http: aiohttp.ClientSession,
    target: Target,
    policy: str,
    sentences: tuple[str, ...],
    prompts: Prompts,
    timeout_s: float,
) -> list[Spoken]:
    url = target.base.replace("http://", "ws://").replace("https://", "wss://") + CHAT_ROUTE
    params = {"say_pacing": policy, "say_after": "hold", "seed": str(prompts.seed)}
    if prompts.voice:
        params["voice_prompt"] = prompts.voice
    if prompts.text is not None:
        params["text_prompt"] = prompts.text
    ws = await _connect(http, target, url, params, min(timeout_s, FULL_RETRY_S))
    async with ws:
        session = _Session(ws, timeout_s)
        deadline = time.monotonic() + timeout_s
        while (await session.receive(deadline))[0] != 0:
            pass  # nothing but errors (raised) is expected before the handshake
        feeder = asyncio.create_task(session.feed(), name=f"selftest-feed-{policy}")
        try:
            results = []
            for index, sentence in enumerate(sentences):
                if feeder.done():
                    feeder.result()  # raises the sender's error
                results.append(await session.say(policy, index, sentence))
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, aiohttp.ClientError):
                await feeder
    return results


async def speak_all(
    target: Target, sentences: tuple[str, ...], prompts: Prompts, timeout_s: float
) -> list[Spoken]:
    """Every sentence under every pacing policy, one session per policy."""
    from .models.say import PACINGS  # noqa: PLC0415

    results: list[Spoken] = []
    async with aiohttp.ClientSession() as http:
        for policy in PACINGS:
            try:
                results += await _speak_policy(http, target, policy, sentences, prompts, timeout_s)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                raise SelftestError(f"{target.base}{CHAT_ROUTE}: {type(exc).__name__}: {exc}") from None
    return results


async def find(base: str, key: str, timeout_s: float) -> Target:
    async with aiohttp.ClientSession() as http:
        return await discover(http, base, key, timeout_s)
