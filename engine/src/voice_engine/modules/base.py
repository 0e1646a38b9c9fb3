"""What every module shares: its configuration, its batch loop, its route, its status and its auth."""

from __future__ import annotations

import hmac
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import msgpack
from aiohttp import web

from ..batch import BatchLoop, status_of
from ..config import EXPERIMENTAL_PRECISIONS, ModuleConfig
from ..metrics import Metrics


def api_key_ok(request: web.Request, keys: Sequence[str]) -> bool:
    """Kyutai's rule: header ``kyutai-api-key`` or query ``auth_id``, one of the configured keys."""
    presented = request.headers.get("kyutai-api-key") or request.query.get("auth_id") or ""
    given = presented.encode("utf-8", "replace")
    return any(hmac.compare_digest(given, key.encode("utf-8")) for key in keys)


def pack(message: dict[str, Any]) -> bytes:
    out = msgpack.packb(message, use_bin_type=True, use_single_float=True)
    assert isinstance(out, bytes)
    return out


def gpu_memory_gib() -> dict[str, float]:
    """This process's CUDA memory: ``allocated`` now and its ``peak`` since start (torch's allocator)."""
    import torch  # noqa: PLC0415 - a CUDA module has loaded torch already

    return {
        "allocated": round(torch.cuda.memory_allocated() / 2**30, 3),
        "peak": round(torch.cuda.max_memory_allocated() / 2**30, 3),
    }


class EngineModule(ABC):
    """One configured module: load its model (blocking), then serve its websocket route."""

    kind: ClassVar[str]
    route: ClassVar[str]

    def __init__(self, cfg: ModuleConfig) -> None:
        self.cfg = cfg
        self.loop: BatchLoop[Any, Any] | None = None
        self.api_keys: tuple[str, ...] = ()
        self.metrics: Metrics | None = None
        self.max_message_bytes = 4 * 1024 * 1024

    @property
    def name(self) -> str:
        return self.cfg.name

    @abstractmethod
    def load(self) -> None:
        """Load the model from ``cfg.model_dir`` (offline), warm it up, create ``self.loop``.

        Runs before the server listens, outside the event loop thread; ``self.loop`` is created in
        :meth:`start` instead when it needs the running event loop.
        """

    @abstractmethod
    def start(self) -> None:
        """Create and start ``self.loop`` (called on the event loop, after :meth:`load`)."""

    @abstractmethod
    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The websocket route: auth, slot, protocol; the slot is released on every way out."""

    def describe(self) -> dict[str, Any]:
        """The module's ``/status`` entry: what it serves and how busy it is."""
        entry: dict[str, Any] = {
            "kind": self.kind,
            "route": self.route,
            "model_dir": str(self.cfg.model_dir),
            "precision": self.cfg.precision,
            "device": self.cfg.device,
        }
        entry["precision_experimental"] = self.cfg.precision in EXPERIMENTAL_PRECISIONS
        if self.cfg.device == "cuda":
            entry["gpu_memory_gib"] = gpu_memory_gib()
        if self.loop is not None:
            entry.update(status_of(self.loop))
        return entry

    def refuse_full(self) -> bytes:
        """The first (and only) message to a client when every slot is taken, as Kyutai's server sends."""
        return pack({"type": "Error", "message": "no free channels"})

    async def close(self) -> None:
        if self.loop is not None:
            await self.loop.close()
