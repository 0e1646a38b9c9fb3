"""``chat``: Moshi's full-duplex websocket protocol at ``/api/chat`` (Kyutai's Moshi, NVIDIA's PersonaPlex).

Compatible with the web clients of ``kyutai-labs/moshi`` (``client/src/protocol/``) and
``NVIDIA/personaplex``, and with ``moshi.client``: binary frames, the first byte is the kind.

* query (checked before the websocket upgrade; a bad value is HTTP 400 with a JSON body
  ``{"error", "reason"}``): ``voice_prompt`` (PersonaPlex: a file name in the module's
  ``voices_dir``, ``.pt`` or audio (``.wav``, ``.mp3``, ``.flac``, ``.ogg``); names only),
  ``text_prompt`` (PersonaPlex; may be empty or absent; wrapped in ``<system>`` tags), ``seed`` (or
  Kyutai's ``text_seed``; absent or -1: a random one), ``text_temperature``, ``text_topk``,
  ``audio_temperature``, ``audio_topk`` (honoured, per conversation; a top-k is clamped to
  ``max_top_k`` / ``max_top_k_text``). Kyutai's ``audio_seed``,
  ``pad_mult``, ``repetition_penalty``, ``repetition_penalty_context``, ``image_url``,
  ``image_resolution``, ``email`` and ``worker_auth_id`` (other than as a key) are accepted and
  ignored. A Moshi model takes no prompt: a non-empty ``voice_prompt``/``text_prompt`` is a 400.
* auth (option ``auth``, on by default): header ``kyutai-api-key`` or query ``auth_id`` (or the Kyutai
  client's ``worker_auth_id``), one of ``api_keys``; HTTP 401 otherwise.
* every slot taken: HTTP 503 with ``{"error": "no free slots", ...}`` at once, before the upgrade.
* server to client: ``0x00`` handshake once the prefill (PersonaPlex's voice and text prompts) has
  run; ``0x01`` + Ogg/Opus pages of the agent's voice (24 kHz mono, one page per 80 ms step; the first
  one carries the Opus headers); ``0x02`` + UTF-8 text pieces of the agent's inner monologue (``▁`` as
  a space; PAD and EPAD are not sent); ``0x05`` + UTF-8 error messages (bad input; the session carries
  on).
* client to server: ``0x01`` + Ogg/Opus (one model step per 1920 decoded samples); ``0x03`` control
  and ``0x06`` ping are accepted and ignored (Kyutai's servers define no action for them), and so is
  ``0x04`` metadata other than the say channel's cancel; an unknown kind, a payload that is not Ogg,
  or a websocket text frame gets an ``0x05`` error.
* the say channel (this engine's own, experimental; ``models/say.py``): ``0x02`` + UTF-8 text = say
  this, in the session's voice, by forcing the words into the model's text stream. Bad UTF-8, a text
  that is empty once characters outside the tokenizer's vocabulary are dropped, a text over
  ``say_max_chars`` characters, or a fifth reply waiting (``say_queue=queue``) gets an ``0x05`` error
  and nothing is said. ``0x04`` + ``{"say": "cancel"}`` stops the reply at the end of the current word
  and drops the waiting ones (another ``"say"`` value is an ``0x05`` error). Query: ``say_pacing``
  (``constrained`` | ``fixed``), ``say_after`` (``free`` | ``hold``: outside a reply the text is held
  to PAD, speaker-only), ``say_queue`` (``queue`` | ``replace``: a new text ends the current reply at
  the end of its word and drops the waiting ones). The engine sends ``0x04`` + one JSON object per
  message: ``say_start`` (``id``, ``text`` as the tokens spell it, ``words``, ``dropped``),
  ``say_word`` (``id``, ``index``, ``word``: when the word's first token is forced) and ``say_end``
  (``id``, ``spoken``, ``reason``: ``done`` | ``cancelled`` | ``barge_in`` | ``replaced``); every
  accepted text gets one ``say_start`` and one ``say_end``, in order of ``id`` (from 1 per
  connection; a text dropped before it started gets both at once, ``spoken`` empty). Barge-in: while a
  reply is said, ``barge_in_frames`` user frames in a row above ``barge_in_dbfs`` (RMS) end it at the
  end of the current word. A session that sends no ``0x02`` is stepped exactly as without the channel.

As Kyutai's server, the first user frame of a conversation without a prefill gives no audio (the
model's audio lags its input by one step); after a prefill every frame gives audio.

Module options (``options`` in the configuration): ``flavor`` (``moshi`` | ``personaplex``; default:
``personaplex`` when ``config.json``'s ``dep_q`` equals ``n_q``), ``default_voice`` (a name in
``voices_dir``, used when the query has none), ``default_text_prompt``, ``temp``, ``temp_text``,
``top_k``, ``top_k_text`` (defaults: the model's ``lm_gen_config``, else moshi's 0.8 / 0.7 / 250 / 25),
``max_top_k`` / ``max_top_k_text`` (the largest a query may ask for; defaults: the defaults),
``auth`` (bool), ``idle_timeout_s`` (30: no message for that long ends the session),
``send_timeout_s`` (10), ``prefill_timeout_s`` (120), ``batch_wait_ms`` (0: a step starts as soon as one
conversation has a frame; up to this long it waits for every conversation's frame, see ``BatchLoop``),
``opus_workers`` (processes that encode the replies' Ogg/Opus, ``opus_pool.py``; 0: in the engine's
process; default: one per 8 slots, at most 8 and the CPUs less 2, so 0 below 8 slots);
the say channel's ``say_max_chars`` (2000),
``say_max_pads`` (8: constrained pacing forces the next word after that many PADs),
``say_frames_per_word`` (5: fixed pacing's frames per word onset), ``say_tail_frames`` (4: PAD steps
after a reply's last word), ``barge_in_dbfs`` (-35), ``barge_in_frames`` (3; 0: no barge-in from the
audio).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import re
import secrets
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sphn
from aiohttp import WSMsgType, web

from ..batch import BatchLoop, Ended, Lease, next_output
from ..config import ConfigError, ModuleConfig
from ..models import chat_prompt, loading
from ..models import say as say_channel
from ..models.chat import FRAME_SIZE, SAMPLE_RATE, ChatOutput, ChatParams, ChatStepper
from ..models.sampling import SamplingParams
from ..opus_pool import OpusPool, OpusPoolError, OpusStream
from .base import EngineModule, api_key_ok

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # pragma: no cover - Python 3.10
    from async_timeout import timeout as _timeout

log = logging.getLogger("voice_engine.chat")

AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg")
VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
KIND_HANDSHAKE, KIND_AUDIO, KIND_TEXT, KIND_CONTROL, KIND_METADATA, KIND_ERROR, KIND_PING = range(7)
IGNORED_QUERY = (
    "audio_seed",
    "pad_mult",
    "repetition_penalty",
    "repetition_penalty_context",
    "image_url",
    "image_resolution",
    "email",
    "worker_auth_id",
    "auth_id",
)
MAX_TEXT_PROMPT_CHARS = 4000

_OPTION_TYPES: dict[str, type | tuple[type, ...]] = {
    "flavor": str,
    "default_voice": str,
    "default_text_prompt": str,
    "temp": (int, float),
    "temp_text": (int, float),
    "top_k": int,
    "top_k_text": int,
    "max_top_k": int,
    "max_top_k_text": int,
    "auth": bool,
    "idle_timeout_s": (int, float),
    "send_timeout_s": (int, float),
    "prefill_timeout_s": (int, float),
    "batch_wait_ms": (int, float),
    "opus_workers": int,
    "say_max_chars": int,
    "say_max_pads": int,
    "say_frames_per_word": int,
    "say_tail_frames": int,
    "barge_in_dbfs": (int, float),
    "barge_in_frames": int,
}
SIGNED_OPTIONS = ("barge_in_dbfs",)
SAY_QUERY: dict[str, tuple[str, ...]] = {
    "say_pacing": say_channel.PACINGS,
    "say_after": say_channel.AFTERS,
    "say_queue": say_channel.QUEUES,
}


def opus_workers_for(slots: int) -> int:
    """The default ``opus_workers``: one process per 8 slots, at most 8 and the CPUs less 2."""
    return min(slots // 8, 8, max(1, (os.cpu_count() or 1) - 2))


class RequestError(ValueError):
    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


@dataclass(frozen=True)
class ChatOptions:
    flavor: str | None = None
    default_voice: str | None = None
    default_text_prompt: str = ""
    temp: float | None = None
    temp_text: float | None = None
    top_k: int | None = None
    top_k_text: int | None = None
    max_top_k: int | None = None
    max_top_k_text: int | None = None
    auth: bool = True
    idle_timeout_s: float = 30.0
    send_timeout_s: float = 10.0
    prefill_timeout_s: float = 120.0
    batch_wait_ms: float = 0.0
    opus_workers: int | None = None  # None: opus_workers_for(slots)
    say_max_chars: int = 2000
    say_max_pads: int = 8
    say_frames_per_word: int = 5
    say_tail_frames: int = 4
    barge_in_dbfs: float = -35.0
    barge_in_frames: int = 3


@dataclass
class _SaySession:
    """The session side of the say channel: reply ids, and how many replies have not ended."""

    config: say_channel.SayConfig
    next_id: int = 1
    open: int = 0


def parse_options(name: str, options: dict[str, Any]) -> ChatOptions:
    values: dict[str, Any] = {}
    for key, value in options.items():
        where = f"modules.{name}.options.{key}"
        kind = _OPTION_TYPES.get(key)
        if kind is None:
            raise ConfigError(f"{where}: unknown option (known: {', '.join(sorted(_OPTION_TYPES))})")
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise ConfigError(
                f"{where}: must be {'a number' if kind == (int, float) else getattr(kind, '__name__', kind)}"
            )
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and value < 0
            and key not in SIGNED_OPTIONS
        ):
            raise ConfigError(f"{where}: must not be negative")
        if key in ("say_max_chars", "say_frames_per_word") and isinstance(value, int) and value < 1:
            raise ConfigError(f"{where}: must be at least 1")
        values[key] = float(value) if kind == (int, float) and isinstance(value, (int, float)) else value
    if values.get("flavor") not in (None, "moshi", "personaplex"):
        raise ConfigError(f"modules.{name}.options.flavor: must be moshi or personaplex")
    return ChatOptions(**values)


def _number(query: Any, keys: tuple[str, ...], kind: type, low: float, high: float) -> Any:
    for key in keys:
        raw = query.get(key)
        if raw is None or raw == "":
            continue
        try:
            value = kind(raw)
        except ValueError:
            raise RequestError(
                f"query parameter {key}={raw[:40]!r} is not a {kind.__name__}", "bad_query"
            ) from None
        if math.isnan(value) or not low <= value <= high:
            raise RequestError(
                f"query parameter {key}={raw[:40]!r} is outside {low:g}..{high:g}", "bad_query"
            )
        return value
    return None


class ChatModule(EngineModule):
    kind = "chat"
    route = "/api/chat"

    def __init__(self, cfg: ModuleConfig) -> None:
        super().__init__(cfg)
        self.options = parse_options(cfg.name, cfg.options)
        self.stepper: ChatStepper | None = None
        self.chat_loop: BatchLoop[np.ndarray[Any, Any], ChatOutput] | None = None
        self._voice_mimi: Any = None
        self._voice_lock = threading.Lock()
        self._voices: dict[str, tuple[float, chat_prompt.Voice]] = {}
        self._prefill_s: collections.deque[float] = collections.deque(maxlen=200)
        self.defaults = SamplingParams(seed=0, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25)
        self.opus_pool: OpusPool | None = None

    # --- lifecycle ---

    def load(self) -> None:
        opts = self.options
        model = loading.open_model_dir(self.cfg.model_dir)
        gen_cfg = model.info.lm_gen_config or {}
        temp = opts.temp if opts.temp is not None else float(gen_cfg.get("temp", 0.8))
        temp_text = opts.temp_text if opts.temp_text is not None else float(gen_cfg.get("temp_text", 0.7))
        top_k = opts.top_k if opts.top_k is not None else int(gen_cfg.get("top_k", 250))
        top_k_text = opts.top_k_text if opts.top_k_text is not None else int(gen_cfg.get("top_k_text", 25))
        max_top_k = opts.max_top_k if opts.max_top_k is not None else top_k
        max_top_k_text = opts.max_top_k_text if opts.max_top_k_text is not None else top_k_text
        self.stepper = ChatStepper.from_model_dir(
            self.cfg.model_dir,
            self.cfg.slots,
            self.cfg.precision,
            self.cfg.device,
            flavor=opts.flavor,
            max_top_k=max(max_top_k, top_k),
            max_top_k_text=max(max_top_k_text, top_k_text),
        )
        self.defaults = SamplingParams(
            seed=0, temp=temp, temp_text=temp_text, top_k=top_k, top_k_text=top_k_text
        )
        if self.stepper.flavor == "personaplex":
            self._voice_mimi = ChatStepper.load_mimi(model, self.stepper.device, self.stepper.dep_q)
            if opts.default_voice:
                try:
                    self._voice(opts.default_voice)
                except RequestError as exc:
                    raise ConfigError(f"modules.{self.name}.options.default_voice: {exc.message}") from None
        elif opts.default_voice or opts.default_text_prompt:
            raise ConfigError(
                f"modules.{self.name}: a Moshi model takes no default_voice or default_text_prompt"
            )
        self.stepper.warmup()

    def start(self) -> None:
        assert self.stepper is not None
        self.chat_loop = BatchLoop(self.name, self.stepper, gather_s=self.options.batch_wait_ms / 1000)
        self.loop = self.chat_loop
        self.chat_loop.start()
        workers = self.options.opus_workers
        workers = opus_workers_for(self.cfg.slots) if workers is None else workers
        if workers > 0:
            self.opus_pool = OpusPool(workers, SAMPLE_RATE, name=f"opus-{self.name}")
            self.opus_pool.start()

    async def close(self) -> None:
        await super().close()
        if self.opus_pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.opus_pool.close)
            self.opus_pool = None

    def describe(self) -> dict[str, Any]:
        entry = super().describe()
        if self.stepper is not None:
            entry["flavor"] = self.stepper.flavor
            entry["ignored_query"] = list(IGNORED_QUERY)
            entry["opus_workers"] = self.opus_pool.workers if self.opus_pool is not None else 0
        if self.stepper is not None and self.stepper.flavor == "personaplex":
            entry["voices"] = self.voice_names()
            entry["default_voice"] = self.options.default_voice
        values = sorted(self._prefill_s)
        entry["prefills"] = len(values)
        entry["prefill_ms_p50"] = round(statistics.median(values) * 1000, 1) if values else None
        entry["prefill_ms_max"] = round(values[-1] * 1000, 1) if values else None
        return entry

    def voice_names(self) -> list[str]:
        folder = self.cfg.voices_dir
        if folder is None:
            return []
        return sorted(
            p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".pt", *AUDIO_SUFFIXES)
        )

    # --- metrics ---

    def _count_session(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.inc("voice_engine_sessions_total", (("module", self.name), ("outcome", outcome)))

    def _count_error(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.inc("voice_engine_client_errors_total", (("module", self.name), ("reason", reason)))

    # --- prompts ---

    def _voice_path(self, name: str) -> Path:
        folder = self.cfg.voices_dir
        if folder is None:
            raise RequestError(
                "this module has no voices_dir: voice_prompt is not available", "unknown_voice"
            )
        if not VOICE_NAME.fullmatch(name) or ".." in name:
            raise RequestError(
                f"voice_prompt {name[:60]!r}: a file name only (letters, digits, '.', '_', '-')", "bad_voice"
            )
        suffix = Path(name).suffix.lower()
        if suffix not in (".pt", *AUDIO_SUFFIXES):
            raise RequestError(
                f"voice_prompt {name!r}: must end in .pt or {', '.join(AUDIO_SUFFIXES)}", "bad_voice"
            )
        path = folder / name
        if not path.is_file() or path.resolve().parent != folder.resolve():
            raise RequestError(f"voice_prompt {name!r} is not in the voice folder", "unknown_voice")
        return path

    def _voice(self, name: str) -> chat_prompt.Voice:
        """Load (and cache, by modification time) a voice; blocking."""
        assert self.stepper is not None
        path = self._voice_path(name)
        mtime = path.stat().st_mtime
        cached = self._voices.get(name)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        voice: chat_prompt.Voice
        try:
            if path.suffix.lower() == ".pt":
                voice = chat_prompt.load_voice_pt(path, self.stepper.layout)
            else:
                pcm = chat_prompt.read_voice_audio(path)
                with self._voice_lock:
                    voice = chat_prompt.encode_voice(self._voice_mimi, pcm, self.stepper.device)
        except chat_prompt.PromptError as exc:
            raise RequestError(str(exc), "bad_voice") from None
        self._voices[name] = (mtime, voice)
        return voice

    def _query(self, request: web.Request) -> tuple[SamplingParams, str | None, str]:
        """The sampling settings and the prompts a request asks for (RequestError if bad)."""
        assert self.stepper is not None
        q = request.query
        d = self.defaults
        seed = _number(q, ("seed", "text_seed"), int, -1, 2**63 - 1)
        if seed is None or seed == -1:
            seed = secrets.randbits(63)
        sampler = self.stepper.sampler
        temp = _number(q, ("audio_temperature",), float, 0.0, 10.0)
        temp_text = _number(q, ("text_temperature",), float, 0.0, 10.0)
        # Clamped to the sampler's width (max_top_k, the vocabulary), as a larger top-k means "all".
        top_k = _number(q, ("audio_topk",), int, 1, 1_000_000)
        top_k_text = _number(q, ("text_topk",), int, 1, 1_000_000)
        top_k = None if top_k is None else min(top_k, sampler.k_audio)
        top_k_text = None if top_k_text is None else min(top_k_text, sampler.k_text)
        params = SamplingParams(
            seed=int(seed),
            temp=d.temp if temp is None else temp,
            temp_text=d.temp_text if temp_text is None else temp_text,
            top_k=d.top_k if top_k is None else top_k,
            top_k_text=d.top_k_text if top_k_text is None else top_k_text,
        )
        voice = q.get("voice_prompt") or None
        text = q.get("text_prompt", "")
        if len(text) > MAX_TEXT_PROMPT_CHARS:
            raise RequestError(f"text_prompt is longer than {MAX_TEXT_PROMPT_CHARS} characters", "bad_query")
        if self.stepper.flavor == "moshi":
            if voice or text.strip():
                raise RequestError(
                    "this module serves a Moshi model: it takes no voice_prompt or text_prompt", "bad_query"
                )
            return params, None, ""
        if voice is None:
            voice = self.options.default_voice
        if "text_prompt" not in q:
            text = self.options.default_text_prompt
        return params, voice, text

    def _say_config(self, request: web.Request) -> say_channel.SayConfig:
        values: dict[str, str] = {}
        for key, allowed in SAY_QUERY.items():
            raw = request.query.get(key)
            if raw is None or raw == "":
                continue
            if raw not in allowed:
                raise RequestError(
                    f"query parameter {key}={raw[:40]!r} is not one of {', '.join(allowed)}", "bad_query"
                )
            values[key.removeprefix("say_")] = raw
        o = self.options
        return say_channel.SayConfig(
            **values,
            max_pads=o.say_max_pads,
            frames_per_word=o.say_frames_per_word,
            tail_frames=o.say_tail_frames,
            barge_in_dbfs=o.barge_in_dbfs,
            barge_in_frames=o.barge_in_frames,
        )

    def default_params(self, seed: int, say_config: say_channel.SayConfig | None) -> ChatParams:
        """A session's parameters from the module's defaults alone (its default voice and text
        prompt; blocking: may encode the voice). For ``voice-engine selftest``."""
        assert self.stepper is not None
        sampling = SamplingParams(
            seed=seed,
            temp=self.defaults.temp,
            temp_text=self.defaults.temp_text,
            top_k=self.defaults.top_k,
            top_k_text=self.defaults.top_k_text,
        )
        if self.stepper.flavor == "moshi":
            return ChatParams(sampling, say=say_config)
        voice = self._voice(self.options.default_voice) if self.options.default_voice else None
        tokens = chat_prompt.text_prompt_tokens(self.stepper.tokenizer, self.options.default_text_prompt)
        prefill = chat_prompt.build_prefill(self.stepper.layout, voice, tokens)
        return ChatParams(sampling, prefill, say=say_config)

    async def _params(self, request: web.Request) -> ChatParams:
        assert self.stepper is not None
        say_config = self._say_config(request)
        sampling, voice_name, text = self._query(request)
        if self.stepper.flavor == "moshi":
            return ChatParams(sampling, say=say_config)
        voice = None
        if voice_name:
            self._voice_path(voice_name)  # refuse a bad name before any work
            voice = await asyncio.get_running_loop().run_in_executor(None, self._voice, voice_name)
        tokens = chat_prompt.text_prompt_tokens(self.stepper.tokenizer, text)
        prefill = chat_prompt.build_prefill(self.stepper.layout, voice, tokens)
        return ChatParams(sampling, prefill, say=say_config)

    # --- the route ---

    def _authorized(self, request: web.Request) -> bool:
        if not self.options.auth or api_key_ok(request, self.api_keys):
            return True
        worker = request.query.get("worker_auth_id", "")
        return bool(worker) and worker in self.api_keys

    @staticmethod
    def _json_error(status: int, message: str, reason: str, **extra: Any) -> web.Response:
        return web.json_response({"error": message, "reason": reason, **extra}, status=status)

    def _full(self) -> web.Response:
        loop = self.chat_loop
        total = loop.slots_total if loop is not None else 0
        return self._json_error(
            503, "no free slots: every conversation slot is taken", "full", slots_total=total
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            self._count_session("unauthorized")
            return self._json_error(
                401, "unauthorized: send the kyutai-api-key header or auth_id", "unauthorized"
            )
        loop, stepper = self.chat_loop, self.stepper
        if loop is None or stepper is None or loop.failed is not None:
            return self._json_error(
                503, f"the chat module is not serving ({loop.failed if loop else 'loading'})", "failed"
            )
        if loop.slots_used >= loop.slots_total:
            self._count_session("full")
            return self._full()
        try:
            params = await self._params(request)
        except RequestError as exc:
            self._count_session("bad_request")
            self._count_error(exc.reason)
            return self._json_error(400, exc.message, exc.reason)
        lease = loop.acquire(params)
        if lease is None:
            self._count_session("full")
            return self._full()
        self._count_session("served")
        ws = web.WebSocketResponse(max_msg_size=self.max_message_bytes, autoping=True)
        try:
            await ws.prepare(request)
            await self._session(request, ws, lease, params)
        except (ConnectionError, asyncio.TimeoutError):
            pass  # the client went away or stopped reading: its slot is released below
        finally:
            lease.release()
            if not ws.closed:
                with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                    await asyncio.wait_for(ws.close(), 2.0)
        return ws

    async def _send(self, ws: web.WebSocketResponse, data: bytes) -> None:
        async with _timeout(self.options.send_timeout_s):
            await ws.send_bytes(data)

    async def _error(self, ws: web.WebSocketResponse, message: str, reason: str) -> None:
        self._count_error(reason)
        await self._send(ws, bytes([KIND_ERROR]) + message.encode("utf-8"))

    async def _session(
        self,
        request: web.Request,
        ws: web.WebSocketResponse,
        lease: Lease[np.ndarray[Any, Any], ChatOutput],
        params: ChatParams,
    ) -> None:
        started = time.monotonic()
        if params.prefill is not None:
            lease.set_continuous(True)  # prefill steps take no input
            try:
                out = await self._prefilled(request, ws, lease)
            except asyncio.TimeoutError:
                await self._error(
                    ws, f"the prefill took over {self.options.prefill_timeout_s:g} s", "prefill_timeout"
                )
                return
            lease.set_continuous(False)
            if out is False:
                return  # the client left during its prefill: the slot is released at once
            if not isinstance(out, ChatOutput) or not out.ready:
                await self._error(ws, lease.closed_reason or "the session was closed", "closed")
                return
            self._prefill_s.append(time.monotonic() - started)
        await self._send(ws, bytes([KIND_HANDSHAKE]))
        assert params.say is not None
        says = _SaySession(params.say)
        reader = asyncio.create_task(self._read(ws, lease, says), name=f"chat-read-{lease.slot}")
        try:
            await self._write(ws, lease, reader, says)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _prefilled(
        self, request: web.Request, ws: web.WebSocketResponse, lease: Lease[np.ndarray[Any, Any], ChatOutput]
    ) -> ChatOutput | bool | None:
        """The prefill's end (its output, or None if the loop closed the lease), or False when the
        client went away while it ran (checked four times a second)."""
        async with _timeout(self.options.prefill_timeout_s):
            while True:
                try:
                    return await asyncio.wait_for(lease.outputs.get(), 0.25)
                except asyncio.TimeoutError:
                    transport = request.transport
                    if ws.closed or transport is None or transport.is_closing():
                        return False

    async def _say_text(
        self,
        ws: web.WebSocketResponse,
        lease: Lease[np.ndarray[Any, Any], ChatOutput],
        says: _SaySession,
        payload: bytes,
    ) -> None:
        """``0x02``: validate, tokenise and hand a reply to the stepper (or answer ``0x05``)."""
        assert self.stepper is not None
        if says.config.queue == "queue" and says.open >= say_channel.MAX_PENDING + 1:
            await self._error(
                ws,
                f"say (0x02): {say_channel.MAX_PENDING} replies are already waiting; this one is not queued",
                "say_queue_full",
            )
            return
        try:
            text = say_channel.decode_utf8(payload)
            item = self.stepper.say_tokens.prepare(text, says.next_id, self.options.say_max_chars)
        except say_channel.SayError as exc:
            await self._error(ws, str(exc), "bad_say")
            return
        says.next_id += 1
        says.open += 1
        self.stepper.say(lease.slot, lease.params, say_channel.Say(item))
        if self.chat_loop is not None:
            self.chat_loop.wake()

    async def _metadata(
        self, ws: web.WebSocketResponse, lease: Lease[np.ndarray[Any, Any], ChatOutput], payload: bytes
    ) -> None:
        """``0x04``: the say channel's cancel; any other metadata is ignored, as Kyutai's servers do."""
        assert self.stepper is not None
        try:
            value = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return
        if not isinstance(value, dict) or "say" not in value:
            return
        if value["say"] != "cancel":
            await self._error(
                ws, f"metadata (0x04): say {str(value['say'])[:40]!r}: only 'cancel'", "bad_say"
            )
            return
        self.stepper.say(lease.slot, lease.params, say_channel.Cancel())

    async def _read(
        self, ws: web.WebSocketResponse, lease: Lease[np.ndarray[Any, Any], ChatOutput], says: _SaySession
    ) -> str:
        """Client frames into the slot's inbox. Returns why it stopped (``closed``, ``idle``)."""
        opus = sphn.OpusStreamReader(SAMPLE_RATE)
        pending: np.ndarray[Any, np.dtype[np.float32]] = np.zeros(0, dtype=np.float32)
        while True:
            try:
                msg = await ws.receive(timeout=self.options.idle_timeout_s)
            except asyncio.TimeoutError:
                self._count_error("idle")
                return "idle"
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return "closed"
            if msg.type == WSMsgType.ERROR:
                self._count_error("too_big" if "too big" in str(msg.data).lower() else "bad_frame")
                return "closed"
            if msg.type != WSMsgType.BINARY:
                await self._error(
                    ws, "text frames are not part of the protocol: send binary frames", "bad_frame"
                )
                continue
            data = bytes(msg.data)
            if not data:
                await self._error(ws, "empty message: the first byte is the kind", "bad_frame")
                continue
            kind, payload = data[0], data[1:]
            if kind in (KIND_CONTROL, KIND_PING):
                continue
            if kind == KIND_METADATA:
                await self._metadata(ws, lease, payload)
                continue
            if kind == KIND_TEXT:
                await self._say_text(ws, lease, says, payload)
                continue
            if kind != KIND_AUDIO:
                await self._error(
                    ws, f"unknown message kind 0x{kind:02x} (expected 0x01 audio)", "unknown_kind"
                )
                continue
            if not payload.startswith(b"OggS"):
                await self._error(ws, "audio (0x01) must be Ogg/Opus pages", "bad_audio")
                continue
            try:
                pcm = np.asarray(opus.append_bytes(payload), dtype=np.float32).reshape(-1)
            except Exception as exc:  # sphn raises plain exceptions with the decoder's message
                await self._error(ws, f"audio (0x01): not decodable Ogg/Opus ({exc})", "bad_audio")
                opus = sphn.OpusStreamReader(SAMPLE_RATE)
                continue
            if pcm.size:
                pending = np.concatenate([pending, pcm]) if pending.size else pcm
            while pending.shape[0] >= FRAME_SIZE:
                lease.submit(np.ascontiguousarray(pending[:FRAME_SIZE]))
                pending = pending[FRAME_SIZE:]

    async def _write(
        self,
        ws: web.WebSocketResponse,
        lease: Lease[np.ndarray[Any, Any], ChatOutput],
        reader: asyncio.Task[str],
        says: _SaySession,
    ) -> None:
        stream = self.opus_pool.stream() if self.opus_pool is not None else None
        try:
            await self._write_outputs(ws, lease, reader, says, stream)
        except OpusPoolError as exc:
            await self._error(ws, f"engine error: {exc}", "closed")
        finally:
            if stream is not None:
                stream.close()

    async def _write_outputs(
        self,
        ws: web.WebSocketResponse,
        lease: Lease[np.ndarray[Any, Any], ChatOutput],
        reader: asyncio.Task[str],
        says: _SaySession,
        stream: OpusStream | None,
    ) -> None:
        """The slot's outputs to the client; the agent's audio encoded here or by ``stream``."""
        opus = sphn.OpusStreamWriter(SAMPLE_RATE) if stream is None else None
        while True:
            out = await next_output(lease, reader)
            if isinstance(out, Ended):
                if out.reader == "idle":
                    await self._error(
                        ws, f"no message for {self.options.idle_timeout_s:g} s: closing", "idle"
                    )
                elif out.closed is not None:
                    await self._error(ws, out.closed, "closed")
                return
            if out.pcm is not None:
                if stream is not None:
                    async with _timeout(self.options.send_timeout_s):
                        data = await stream.encode(out.pcm)
                else:
                    assert opus is not None
                    data = bytes(opus.append_pcm(out.pcm))
                if data:
                    await self._send(ws, bytes([KIND_AUDIO]) + data)
            if out.text:
                await self._send(ws, bytes([KIND_TEXT]) + out.text.encode("utf-8"))
            for event in out.events:
                if event.get("type") == "say_end":
                    says.open -= 1
                await self._send(ws, bytes([KIND_METADATA]) + json.dumps(event).encode("utf-8"))
