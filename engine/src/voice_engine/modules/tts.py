"""``tts``: Kyutai's streaming text-to-speech protocol at ``/api/tts_streaming``.

The protocol of Kyutai's ``moshi-server`` (``rust/moshi-server/src/py_module.rs``, ``tts.rs``,
``main.rs``), as the bridge's ``TtsClient``, Kyutai's ``scripts/tts_rust_server.py`` and Unmute speak it:

* query: ``format`` (``OggOpus`` by default, as Kyutai's server; ``OggOpusMessagePack``,
  ``PcmMessagePack``, ``Pcm``), ``voice`` (a voice name from the module's ``voices_dir``; names
  only), and optionally ``seed``,
  ``temperature``, ``top_k`` and ``cfg_alpha``; auth with the ``kyutai-api-key`` header or the
  ``auth_id`` query parameter, else HTTP 401; an unknown ``format`` is HTTP 400;
* client to server, binary MessagePack maps: ``{"type":"Text","text":...}`` (words; any number of
  messages, as the text comes) and ``{"type":"Eos"}``; as Kyutai's server also does, a websocket text
  frame is text and the binary frame ``b"\\0"`` is Eos;
* server to client, in the MessagePack formats: ``Ready`` first (then, for ``OggOpusMessagePack``, an
  ``OggOpus`` message with the Ogg header), ``Audio {pcm: [1920 float32]}`` or ``OggOpus {data}`` per
  80 ms frame (audio starts before Eos when the text streams in), ``Text {text, start_s, stop_s}``
  word timings, ``Error {message}``; the server closes the socket when the speech is done. The raw
  formats carry audio only (``OggOpus``: the Ogg header, then pages; ``Pcm``: little-endian float32
  frames); an error there is the websocket close reason;
* every slot taken: ``Error "no free channels"`` as the first message, then close.

Bad input (not MessagePack, an unknown ``type``, a wrong field, too much text, text after Eos) gets an
``Error`` and the session carries on; an unknown voice or a bad query value gets an ``Error`` and the
session ends. Each is counted in ``voice_engine_client_errors_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
from dataclasses import dataclass, fields
from typing import Any

import msgpack
import numpy as np
import sphn
from aiohttp import WSMsgType, web

from ..batch import BatchLoop, Ended, Lease, next_output
from ..config import ConfigError, ModuleConfig
from ..models.tts import (
    TtsEos,
    TtsInput,
    TtsOutput,
    TtsParams,
    TtsSettings,
    TtsStepper,
    TtsText,
    VoiceError,
)
from .base import EngineModule, api_key_ok, pack

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # pragma: no cover - Python 3.10
    from async_timeout import timeout as _timeout

log = logging.getLogger("voice_engine.tts")

FORMATS = ("OggOpusMessagePack", "PcmMessagePack", "OggOpus", "Pcm")
DEFAULT_FORMAT = "OggOpus"  # as Kyutai's server (main.rs, default_format)
SAMPLE_RATE = 24000
CLOSE_POLICY = 1008  # websocket close code for a refused request (raw formats)
CLOSE_TRY_AGAIN = 1013

# Module options that are not the stepper's (TtsSettings holds the others).
SESSION_OPTIONS: dict[str, tuple[type, Any]] = {
    "idle_timeout_s": (float, 30.0),  # before Eos, the longest wait for the next client message
    "send_timeout_s": (float, 10.0),  # the longest a send to the client may take
    "max_text_chars": (int, 4096),  # per Text message
    "max_session_chars": (int, 20000),  # per session
    "backlog_frames": (int, 64),  # unread frames at which a session's generation pauses
}


_SETTING_TYPES: dict[str, type] = {
    "n_q": int,
    "default_voice": str,
    "top_k": int,
    "top_k_text": int,
    "padding_between": int,
    "max_padding": int,
    "initial_padding": int,
    "final_padding": int,
    "max_steps": int,
}


@dataclass(frozen=True)
class SessionLimits:
    idle_timeout_s: float = 30.0
    send_timeout_s: float = 10.0
    max_text_chars: int = 4096
    max_session_chars: int = 20000
    backlog_frames: int = 64


class RequestError(ValueError):
    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


def parse_options(name: str, options: dict[str, Any]) -> tuple[TtsSettings, SessionLimits]:
    """The module's ``options`` object, checked: ``TtsSettings`` fields plus :data:`SESSION_OPTIONS`."""
    settings_types: dict[str, type] = {f.name: _SETTING_TYPES.get(f.name, float) for f in fields(TtsSettings)}
    settings: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    for key, value in options.items():
        where = f"modules.{name}.options.{key}"
        target = limits if key in SESSION_OPTIONS else settings
        kind = SESSION_OPTIONS[key][0] if key in SESSION_OPTIONS else settings_types.get(key)
        if kind is None:
            known = sorted([*settings_types, *SESSION_OPTIONS])
            raise ConfigError(f"{where}: unknown option (known: {', '.join(known)})")
        accepted: tuple[type, ...] = (int, float) if kind is float else (kind,)
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise ConfigError(f"{where}: must be {'a number' if kind is float else kind.__name__}")
        if isinstance(value, (int, float)) and value < 0:
            raise ConfigError(f"{where}: must not be negative")
        target[key] = float(value) if kind is float and isinstance(value, (int, float)) else value
    return TtsSettings(**settings), SessionLimits(**limits)


def _query_number(query: Any, key: str, kind: type, low: float, high: float) -> Any:
    raw = query.get(key)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise RequestError(
            f"query parameter {key}={raw[:40]!r} is not a {kind.__name__}", "bad_query"
        ) from None
    if not low <= value <= high or math.isnan(value):
        raise RequestError(f"query parameter {key}={raw[:40]!r} is outside {low}..{high}", "bad_query")
    return value


def _pack_f64(message: dict[str, Any]) -> bytes:
    return bytes(msgpack.packb(message, use_bin_type=True))


class _Encoder:
    """One session's output framing, per ``format``."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.msgpack = fmt.endswith("MessagePack")
        self._opus: Any = None
        if fmt.startswith("OggOpus"):
            self._opus = sphn.OpusStreamWriter(SAMPLE_RATE)

    def start(self) -> list[bytes]:
        """``Ready`` (MessagePack formats) and the Ogg header (Ogg formats)."""
        out = [pack({"type": "Ready"})] if self.msgpack else []
        if self._opus is not None:
            header = self._opus.append_pcm(np.zeros(0, dtype=np.float32))
            if header:
                out.append(pack({"type": "OggOpus", "data": header}) if self.msgpack else header)
        return out

    def audio(self, pcm: np.ndarray[Any, np.dtype[np.float32]]) -> bytes | None:
        if self._opus is not None:
            data = bytes(self._opus.append_pcm(pcm.astype(np.float32, copy=False)))
            if not data:
                return None
            return pack({"type": "OggOpus", "data": data}) if self.msgpack else data
        if self.msgpack:
            return pack({"type": "Audio", "pcm": pcm.astype(np.float32, copy=False).tolist()})
        return bytes(pcm.astype("<f4", copy=False).tobytes())

    def word(self, text: str, start_s: float, stop_s: float) -> bytes | None:
        if not self.msgpack or not text:
            return None
        # Timings as float64, as Kyutai's server writes them (pack() writes float32 for the PCM).
        return _pack_f64(
            {"type": "Text", "text": text, "start_s": float(start_s), "stop_s": float(stop_s)},
        )


class TtsModule(EngineModule):
    kind = "tts"
    route = "/api/tts_streaming"

    def __init__(self, cfg: ModuleConfig) -> None:
        super().__init__(cfg)
        self.settings, self.limits = parse_options(cfg.name, cfg.options)
        self.stepper: TtsStepper | None = None
        self.tts_loop: BatchLoop[TtsInput, TtsOutput] | None = None

    # --- lifecycle ---

    def load(self) -> None:
        try:
            self.stepper = TtsStepper.load(
                self.cfg.model_dir,
                slots=self.cfg.slots,
                device=self.cfg.device,
                precision=self.cfg.precision,
                voices_dir=self.cfg.voices_dir,
                settings=self.settings,
            )
        except VoiceError as exc:
            raise ConfigError(f"modules.{self.name}: {exc}") from None
        self._warm_up()

    def _warm_up(self) -> None:
        """Batched steps on every slot until Mimi has decoded a few frames.

        CUDA graphs get captured and kernels picked here, not in the first session (on an H200 the
        first Mimi decodes took hundreds of milliseconds).
        """
        stepper = self.stepper
        assert stepper is not None
        slots = range(stepper.slots)
        params = TtsParams(voice=stepper.default_voice, seed=0)
        words: list[TtsInput] = [TtsText(" ".join(["warm", "up", "the", "model"] * 8)), TtsEos()]
        stepper.step({s: words for s in slots}, {s: params for s in slots})
        for _ in range(stepper.delay_steps + stepper.max_delay + 3):
            stepper.step({s: [] for s in slots}, {})

    def start(self) -> None:
        assert self.stepper is not None
        self.tts_loop = BatchLoop(self.name, self.stepper, take_all=True)
        self.loop = self.tts_loop
        self.tts_loop.start()

    def describe(self) -> dict[str, Any]:
        entry = super().describe()
        if self.stepper is not None:
            entry["voices"] = self.stepper.voice_names()
            entry["default_voice"] = self.stepper.default_voice.name if self.stepper.default_voice else None
        return entry

    # --- metrics ---

    def _count_session(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.inc("voice_engine_sessions_total", (("module", self.name), ("outcome", outcome)))

    def _count_error(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.inc("voice_engine_client_errors_total", (("module", self.name), ("reason", reason)))

    # --- the route ---

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not api_key_ok(request, self.api_keys):
            self._count_session("unauthorized")
            return web.Response(status=401, text="unauthorized: send the kyutai-api-key header or auth_id\n")
        fmt = request.query.get("format", DEFAULT_FORMAT)
        if fmt not in FORMATS:
            self._count_session("bad_request")
            self._count_error("bad_query")
            return web.Response(status=400, text=f"format must be one of {', '.join(FORMATS)}\n")
        ws = web.WebSocketResponse(max_msg_size=self.max_message_bytes, autoping=True)
        await ws.prepare(request)
        encoder = _Encoder(fmt)
        loop = self.tts_loop
        stepper = self.stepper
        if loop is None or stepper is None:
            await self._refuse(ws, encoder, "the TTS module is not ready", CLOSE_TRY_AGAIN)
            return ws
        try:
            params = await self._params(request, stepper)
        except RequestError as exc:
            self._count_session("bad_request")
            self._count_error(exc.reason)
            await self._refuse(ws, encoder, exc.message, CLOSE_POLICY)
            return ws
        lease = loop.acquire(params)
        if lease is None:
            self._count_session("full")
            await self._refuse(ws, encoder, "no free channels", CLOSE_TRY_AGAIN)
            return ws
        self._count_session("served")
        try:
            await self._session(ws, lease, encoder)
        except (ConnectionError, asyncio.TimeoutError):
            pass  # the client went away or stopped reading: its slot is released below
        finally:
            lease.release()
            if not ws.closed:
                await self._close(ws)
        return ws

    async def _params(self, request: web.Request, stepper: TtsStepper) -> TtsParams:
        query = request.query
        if "voices" in query:
            raise RequestError("'voices' (several voices) is not supported; use 'voice'", "bad_query")
        seed = _query_number(query, "seed", int, 0, 2**64 - 1)
        temp = _query_number(query, "temperature", float, 0.0, 10.0)
        top_k = _query_number(query, "top_k", int, 0, 1_000_000)
        cfg = _query_number(query, "cfg_alpha", float, 0.0, 100.0)
        if top_k is not None and top_k > stepper.sampler.k_audio:
            raise RequestError(f"top_k must be at most {stepper.sampler.k_audio}", "bad_query")
        voice = None
        name = query.get("voice")
        if stepper.multi_speaker:
            if not name:
                voice = stepper.default_voice
            else:
                try:
                    voice = await asyncio.get_running_loop().run_in_executor(None, stepper.load_voice, name)
                except VoiceError as exc:
                    raise RequestError(str(exc), "unknown_voice") from None
        params = TtsParams(
            voice=voice,
            seed=42 if seed is None else seed,  # Kyutai's default seed
            temp=self.settings.temp if temp is None else temp,
            top_k=self.settings.top_k if top_k is None else top_k,
            cfg_coef=cfg,
        )
        try:
            stepper.check_params(params)
        except VoiceError as exc:
            raise RequestError(str(exc), "bad_query") from None
        return params

    async def _send(self, ws: web.WebSocketResponse, data: bytes) -> None:
        async with _timeout(self.limits.send_timeout_s):
            await ws.send_bytes(data)

    async def _refuse(self, ws: web.WebSocketResponse, encoder: _Encoder, message: str, code: int) -> None:
        try:
            if encoder.msgpack:
                await self._send(ws, pack({"type": "Error", "message": message}))
                await self._close(ws)
            else:
                await self._close(ws, code, message)
        except (ConnectionError, asyncio.TimeoutError):
            pass

    @staticmethod
    async def _close(ws: web.WebSocketResponse, code: int = 1000, message: str = "") -> None:
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
            await asyncio.wait_for(ws.close(code=code, message=message.encode("utf-8")[:120]), 2.0)

    async def _error(self, ws: web.WebSocketResponse, encoder: _Encoder, message: str, reason: str) -> None:
        """A client error: an Error message (MessagePack formats); the session carries on."""
        self._count_error(reason)
        if encoder.msgpack:
            await self._send(ws, pack({"type": "Error", "message": message}))
        else:
            log.info("tts session: %s (%s format: no Error message)", message, encoder.fmt)

    async def _session(
        self, ws: web.WebSocketResponse, lease: Lease[TtsInput, TtsOutput], encoder: _Encoder
    ) -> None:
        for data in encoder.start():
            await self._send(ws, data)
        reader = asyncio.create_task(self._read(ws, lease, encoder), name=f"tts-read-{lease.slot}")
        try:
            await self._write(ws, lease, encoder, reader)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _read(
        self, ws: web.WebSocketResponse, lease: Lease[TtsInput, TtsOutput], encoder: _Encoder
    ) -> str:
        """Client messages into the slot's inbox. Returns why it stopped (``closed``, ``idle``)."""
        eos = False
        chars = 0
        while True:
            try:
                msg = await ws.receive(timeout=None if eos else self.limits.idle_timeout_s)
            except asyncio.TimeoutError:
                self._count_error("idle")
                return "idle"
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return "closed"
            if msg.type == WSMsgType.ERROR:
                self._count_error("too_big" if "too big" in str(msg.data).lower() else "bad_frame")
                return "closed"
            text: str | None = None
            if msg.type == WSMsgType.TEXT:
                text = str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                data = bytes(msg.data)
                if data == b"\0":
                    text = None
                    kind = "Eos"
                else:
                    try:
                        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
                    except Exception:  # msgpack raises several unrelated exception types
                        await self._error(ws, encoder, "bad message: not MessagePack", "bad_message")
                        continue
                    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
                        await self._error(
                            ws, encoder, "bad message: not a map with a string 'type'", "bad_message"
                        )
                        continue
                    kind = obj["type"]
                    if kind == "Text":
                        if not isinstance(obj.get("text"), str):
                            await self._error(
                                ws, encoder, "bad Text message: 'text' must be a string", "bad_field"
                            )
                            continue
                        text = obj["text"]
                    elif kind == "Voice":
                        await self._error(
                            ws,
                            encoder,
                            "Voice messages are not supported: choose a voice with ?voice=NAME",
                            "unsupported",
                        )
                        continue
                    elif kind != "Eos":
                        await self._error(
                            ws,
                            encoder,
                            f"unknown message type {kind[:40]!r} (expected Text or Eos)",
                            "unknown_type",
                        )
                        continue
                if text is None:  # Eos
                    if not eos:
                        eos = True
                        lease.submit(TtsEos())
                    continue
            else:
                continue
            if eos:
                await self._error(ws, encoder, "text after Eos is ignored", "text_after_eos")
                continue
            if len(text) > self.limits.max_text_chars:
                await self._error(
                    ws,
                    encoder,
                    f"Text message longer than {self.limits.max_text_chars} characters: ignored",
                    "text_too_long",
                )
                continue
            if chars + len(text) > self.limits.max_session_chars:
                await self._error(
                    ws,
                    encoder,
                    f"more than {self.limits.max_session_chars} characters in this session: ignored",
                    "text_too_long",
                )
                continue
            chars += len(text) + 1
            lease.submit(TtsText(text))

    async def _write(
        self,
        ws: web.WebSocketResponse,
        lease: Lease[TtsInput, TtsOutput],
        encoder: _Encoder,
        reader: asyncio.Task[str],
    ) -> None:
        paused = False
        while True:
            out = await next_output(lease, reader)
            if isinstance(out, Ended):
                if out.reader == "idle":
                    message = f"no text or Eos for {self.limits.idle_timeout_s:g} s: closing"
                    await self._refuse(ws, encoder, message, CLOSE_POLICY)
                elif out.closed is not None:
                    await self._refuse(ws, encoder, out.closed, CLOSE_TRY_AGAIN)
                return
            for message in out.rejected:
                await self._error(ws, encoder, message, "bad_text")
            for word in out.words:
                data = encoder.word(word.text, word.start_s, word.stop_s)
                if data is not None:
                    await self._send(ws, data)
            if out.pcm is not None:
                data = encoder.audio(out.pcm)
                if data is not None:
                    await self._send(ws, data)
            if out.error is not None:
                await self._error(ws, encoder, out.error, "too_long")
            if out.done:
                lease.set_continuous(False)
                await self._close(ws)
                return
            # Backpressure: a client that plays the audio in real time reads slower than the model
            # speaks; pause this slot's steps while its unread frames pile up (the batch loop would
            # close a lease whose queue is full), and resume once it has read most of them.
            backlog = lease.outputs.qsize()
            if backlog >= self.limits.backlog_frames:
                paused = True
            elif backlog <= self.limits.backlog_frames // 2:
                paused = False
            lease.set_continuous(not out.waiting and not paused)
