"""The ``asr`` module: Kyutai's streaming speech-to-text protocol at ``/api/asr-streaming``.

Byte-compatible with Kyutai's Rust ``moshi-server`` (``rust/moshi-server/src/asr.rs`` and
``batched_asr.rs``): every message is one binary websocket frame holding one MessagePack map whose
``type`` field names it.

Client to server:

* ``{"type": "Audio", "pcm": [float, ...]}``: mono float32 PCM at 24 kHz, any length; it is buffered
  and cut into 1920-sample (80 ms) frames, one model step each.
* ``{"type": "Marker", "id": int}``: echoed back once all the audio sent before it has been stepped
  *and* the model's text delay (``asr_delay_in_tokens`` steps) has passed, as Kyutai's server does; so
  a client sends some silence after its marker (Kyutai's clients do).
* ``{"type": "Init"}`` is accepted and ignored (Kyutai's server uses it internally).

Server to client: ``Ready`` first; ``Word {text, start_time}``; ``EndWord {stop_time}``;
``Step {step_idx, prs, buffered_pcm}`` at every step when the model has pause-prediction heads
(``prs``: per head, the probability of class 0; ``buffered_pcm``: samples waiting, as Kyutai's
batched server reports); ``Marker {id}``; ``Error {message}``.

Auth: header ``kyutai-api-key`` or query ``auth_id``, else HTTP 401. All slots taken: ``Error``
``"no free channels"`` as the first message, then close. Bad input (not MessagePack, a wrong type or
field, a ``pcm`` that is not a list of finite numbers, a message over the size limit, too much audio
buffered) gets an ``Error`` naming the problem and the session carries on; a message over twice the
size limit is refused by the websocket layer (close code 1009). A client that stops reading is dropped
(``Error`` "client too slow" where it can still be sent); nothing a client does reaches another slot.

Options (``modules.<name>.options``): ``asr_delay_in_tokens`` (default: from the model's
``stt_config``), ``max_buffered_seconds`` (default 120), ``idle_timeout_s`` (default 120: no message
for that long ends the session), ``send_timeout_s`` (default 10).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from typing import Any

import msgpack
import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from ..batch import BatchLoop, Lease
from ..config import ConfigError, ModuleConfig
from ..metrics import Labels
from .base import EngineModule, api_key_ok

log = logging.getLogger("voice_engine.modules.asr")

FRAME_SIZE = 1920
SAMPLE_RATE = 24000
I64_MIN, I64_MAX = -(2**63), 2**63 - 1


_PACK64 = msgpack.Packer(use_bin_type=True)
_PACK32 = msgpack.Packer(use_bin_type=True, use_single_float=True)
_F32_FIELDS = frozenset({"prs"})  # Rust: prs is Vec<f32>; start_time / stop_time are f64


def pack_kyutai(message: dict[str, Any]) -> bytes:
    """MessagePack exactly as Kyutai's server writes it: a map, ``type`` first, f32 only for ``prs``."""
    out = [_PACK64.pack_map_header(len(message))]
    for key, value in message.items():
        out.append(_PACK64.pack(key))
        out.append((_PACK32 if key in _F32_FIELDS else _PACK64).pack(value))
    return b"".join(out)


class BadMessage(ValueError):
    """A client message that cannot be used; its text goes back in an ``Error``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_message(data: bytes) -> dict[str, Any]:
    """Decode one client frame into a checked message (``Audio`` pcm as float32 numpy)."""
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad bytes
        raise BadMessage("bad_msgpack", f"not a MessagePack message ({type(exc).__name__})") from None
    if not isinstance(msg, dict):
        raise BadMessage("bad_message", f"a message must be a MessagePack map, got {type(msg).__name__}")
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise BadMessage("bad_message", "a message needs a string field 'type' (Audio, Marker)")
    if kind == "Audio":
        return {"type": "Audio", "pcm": _pcm(msg)}
    if kind == "Marker":
        marker = msg.get("id")
        if type(marker) is not int or not I64_MIN <= marker <= I64_MAX:
            raise BadMessage("bad_field", "Marker needs an integer field 'id' (64-bit)")
        return {"type": "Marker", "id": marker}
    if kind == "Init":
        return {"type": "Init"}
    if kind == "OggOpus":
        raise BadMessage("unsupported", "OggOpus input is not supported here; send Audio with float32 pcm")
    raise BadMessage("bad_type", f"unknown message type {kind[:40]!r}; expected Audio or Marker")


Pcm = np.ndarray[Any, np.dtype[np.float32]]


def _pcm(msg: dict[str, Any]) -> Pcm:
    pcm = msg.get("pcm")
    if not isinstance(pcm, list):
        got = "nothing" if pcm is None else type(pcm).__name__
        raise BadMessage("bad_field", f"Audio needs a field 'pcm' with a list of numbers, got {got}")
    if not all(type(x) is float or type(x) is int for x in pcm):
        bad = next(x for x in pcm if not (type(x) is float or type(x) is int))
        raise BadMessage("bad_field", f"Audio 'pcm' must hold numbers only, found {type(bad).__name__}")
    try:
        arr = np.asarray(pcm, dtype=np.float32)
    except OverflowError:
        raise BadMessage("bad_field", "Audio 'pcm' holds a number too large for float32") from None
    if not np.isfinite(arr).all():
        raise BadMessage("bad_field", "Audio 'pcm' must hold finite numbers (no NaN or infinity)")
    return arr


class AsrSession:
    """One websocket session on one slot: reads the client, writes the slot's outputs."""

    def __init__(self, module: AsrModule, ws: web.WebSocketResponse, lease: Lease[Any, Any]) -> None:
        self.module = module
        self.ws = ws
        self.lease = lease
        self.leftover: Pcm = np.zeros(0, dtype=np.float32)
        self.frames_submitted = 0
        self.steps_done = 0
        self.markers: collections.deque[tuple[int, int]] = collections.deque()  # (target step, id)
        self.send_lock = asyncio.Lock()
        self.closing: str | None = None

    # --- sending ---

    async def send(self, message: dict[str, Any]) -> bool:
        """Send one message; False once the session can no longer send (it is then closing)."""
        if self.ws.closed or self.closing is not None:
            return False
        try:
            async with self.send_lock:
                await asyncio.wait_for(self.ws.send_bytes(pack_kyutai(message)), self.module.send_timeout_s)
        except asyncio.TimeoutError:
            self.closing = "client too slow"
            self.module.count_error("too_slow")
            return False
        except (ConnectionError, RuntimeError):
            self.closing = "client gone"
            return False
        return True

    async def error(self, reason: str, text: str) -> None:
        self.module.count_error(reason)
        await self.send({"type": "Error", "message": text})

    async def write_outputs(self) -> None:
        """Turn the slot's step outputs into Step/Word/EndWord/Marker messages, in Kyutai's order."""
        while True:
            out = await self.lease.outputs.get()
            if out is None or self.lease.closed_reason is not None:
                # The loop closed the lease: a client too slow to read, or a model failure.
                reason = self.lease.closed_reason or "session closed"
                self.module.count_error("too_slow" if reason == "client too slow" else "engine")
                await self.send({"type": "Error", "message": reason})
                self.closing = reason
                await self.ws.close()
                return
            self.steps_done = out.step_idx
            if out.prs is not None:
                buffered = len(self.lease.inbox) * FRAME_SIZE + len(self.leftover)
                step = {
                    "type": "Step",
                    "step_idx": out.step_idx,
                    "prs": list(out.prs),
                    "buffered_pcm": buffered,
                }
                if not await self.send(step):
                    return
            if out.word is not None:
                word = {"type": "Word", "text": out.word.text, "start_time": out.word.start_time}
                if not await self.send(word):
                    return
            if out.end_word is not None and not await self.send(
                {"type": "EndWord", "stop_time": out.end_word}
            ):
                return
            if not await self.flush_markers():
                return

    async def flush_markers(self) -> bool:
        while self.markers and self.markers[0][0] <= self.steps_done:
            _, marker = self.markers.popleft()
            if not await self.send({"type": "Marker", "id": marker}):
                return False
        return True

    # --- receiving ---

    def add_audio(self, pcm: Pcm) -> str | None:
        """Buffer ``pcm`` and submit whole frames; a refusal message when the buffer would overflow."""
        pending = len(self.lease.inbox) * FRAME_SIZE + len(self.leftover) + len(pcm)
        if pending > self.module.max_buffered_samples:
            limit = self.module.max_buffered_samples / SAMPLE_RATE
            return (
                f"too much audio buffered ({pending / SAMPLE_RATE:.1f} s, limit {limit:g} s): this "
                "audio was dropped; send audio closer to real time"
            )
        data: Pcm = np.concatenate([self.leftover, pcm]) if len(self.leftover) else pcm
        whole = len(data) // FRAME_SIZE
        for i in range(whole):
            self.lease.submit(np.ascontiguousarray(data[i * FRAME_SIZE : (i + 1) * FRAME_SIZE]))
        self.frames_submitted += whole
        self.leftover = data[whole * FRAME_SIZE :].copy()
        return None

    async def handle_frame(self, data: bytes) -> None:
        if len(data) > self.module.max_message_bytes:
            await self.error(
                "too_large",
                f"message of {len(data)} bytes is over the limit of {self.module.max_message_bytes} bytes; "
                "it was dropped: send audio in smaller pieces",
            )
            return
        try:
            msg = parse_message(data)
        except BadMessage as exc:
            await self.error(exc.reason, str(exc))
            return
        if msg["type"] == "Audio":
            refusal = self.add_audio(msg["pcm"])
            if refusal is not None:
                await self.error("overflow", refusal)
        elif msg["type"] == "Marker":
            target = self.frames_submitted + self.module.asr_delay_in_tokens
            self.markers.append((target, msg["id"]))
            await self.flush_markers()

    async def read_client(self) -> None:
        idle = self.module.idle_timeout_s
        while self.closing is None:
            try:
                msg = await self.ws.receive(timeout=idle)
            except asyncio.TimeoutError:
                await self.error("idle", f"no message for {idle:g} s; closing the session")
                return
            if msg.type == WSMsgType.BINARY:
                await self.handle_frame(msg.data)
            elif msg.type == WSMsgType.TEXT:
                await self.error(
                    "text_frame", "text frames are not part of the protocol; send binary MessagePack"
                )
            elif msg.type == WSMsgType.ERROR:
                too_big = getattr(msg.data, "code", None) == WSCloseCode.MESSAGE_TOO_BIG
                reason = "too_large" if too_big else "ws_error"
                self.module.count_error(reason)
                log.info("asr session: websocket error: %s", msg.data)
                return
            else:  # CLOSE, CLOSING, CLOSED
                return

    async def run(self) -> None:
        if not await self.send({"type": "Ready"}):
            return
        writer = asyncio.get_running_loop().create_task(self.write_outputs())
        reader = asyncio.get_running_loop().create_task(self.read_client())
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, writer):
                if not task.done():
                    task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            for task in (reader, writer):
                if not task.cancelled() and task.exception() is not None:
                    log.error("asr session task failed", exc_info=task.exception())


class AsrModule(EngineModule):
    kind = "asr"
    route = "/api/asr-streaming"

    def __init__(self, cfg: ModuleConfig) -> None:
        super().__init__(cfg)
        self.stepper: Any = None
        self.asr_delay_in_tokens = 0
        self.max_buffered_samples = 120 * SAMPLE_RATE
        self.idle_timeout_s = 120.0
        self.send_timeout_s = 10.0
        self.close_timeout_s = 2.0

    def _read_options(self) -> int | None:
        opts, name = self.cfg.options, self.cfg.name
        known = {"asr_delay_in_tokens", "max_buffered_seconds", "idle_timeout_s", "send_timeout_s"}
        unknown = set(opts) - known
        if unknown:
            raise ConfigError(f"modules.{name}.options: unknown key(s) {', '.join(sorted(unknown))}")
        self.max_buffered_samples = int(_opt_num(opts, "max_buffered_seconds", 120.0, name) * SAMPLE_RATE)
        self.idle_timeout_s = _opt_num(opts, "idle_timeout_s", 120.0, name)
        self.send_timeout_s = _opt_num(opts, "send_timeout_s", 10.0, name)
        return _opt_int(opts, "asr_delay_in_tokens", None, name)

    def load(self) -> None:
        from ..models.asr import AsrStepper  # noqa: PLC0415 - torch only where asr is configured

        delay = self._read_options()
        started = time.monotonic()
        stepper = AsrStepper.from_model_dir(
            self.cfg.model_dir, self.cfg.slots, self.cfg.precision, self.cfg.device, delay
        )
        stepper.warmup()
        self.stepper = stepper
        self.asr_delay_in_tokens = stepper.asr_delay_in_tokens
        log.info(
            "asr %s: %d slots, %s on %s, text delay %d steps, %s pause heads, ready in %.1f s",
            self.name,
            self.cfg.slots,
            self.cfg.precision,
            self.cfg.device,
            stepper.asr_delay_in_tokens,
            len(stepper.lm.extra_heads),
            time.monotonic() - started,
        )

    def start(self) -> None:
        assert self.stepper is not None, "load() first"
        self.loop = BatchLoop(self.name, self.stepper)
        self.loop.start()

    def describe(self) -> dict[str, Any]:
        entry = super().describe()
        entry["asr_delay_in_tokens"] = self.asr_delay_in_tokens
        return entry

    def _labels(self, **extra: str) -> Labels:
        return (("module", self.name), *extra.items())

    def count_error(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.inc("voice_engine_client_errors_total", self._labels(reason=reason))

    def count_session(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.inc("voice_engine_sessions_total", self._labels(outcome=outcome))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not api_key_ok(request, self.api_keys):
            self.count_session("unauthorized")
            return web.Response(
                status=401,
                text="unauthorized: send a valid key in the 'kyutai-api-key' header or the auth_id query\n",
            )
        ws = web.WebSocketResponse(
            max_msg_size=2 * self.max_message_bytes, heartbeat=10.0, timeout=self.close_timeout_s
        )
        await ws.prepare(request)
        assert self.loop is not None
        lease = self.loop.acquire()
        if lease is None:
            if self.loop.failed is not None:  # the model broke: say so rather than "no free channels"
                self.count_session("failed")
                refusal = pack_kyutai(
                    {"type": "Error", "message": f"the {self.name} module failed: {self.loop.failed}"}
                )
            else:
                self.count_session("full")
                refusal = self.refuse_full()
            with contextlib.suppress(asyncio.TimeoutError, ConnectionError, RuntimeError):
                await asyncio.wait_for(ws.send_bytes(refusal), self.send_timeout_s)
            await self._close(ws)
            return ws
        self.count_session("served")
        try:
            await AsrSession(self, ws, lease).run()
        finally:
            lease.release()
            await self._close(ws)
        return ws

    async def _close(self, ws: web.WebSocketResponse) -> None:
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError, RuntimeError):
            await asyncio.wait_for(ws.close(), self.close_timeout_s + 1.0)


def _opt_num(opts: dict[str, Any], key: str, default: float, module: str) -> float:
    value = opts.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"modules.{module}.options.{key}: must be a positive number, got {value!r}")
    return float(value)


def _opt_int(opts: dict[str, Any], key: str, default: int | None, module: str) -> int | None:
    value = opts.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"modules.{module}.options.{key}: must be a non-negative integer, got {value!r}")
    return value
