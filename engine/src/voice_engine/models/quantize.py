"""Quantised chat LMs: ``q8`` (moshi's own int8 ``QLinear``) and ``nf4`` (bitsandbytes 4-bit, experimental).

``q8`` is moshi 0.2.13's int8 path (``moshi.utils.quantize.QLinear``: bitsandbytes LLM.int8 row-wise
weights ``weight`` (int8) with per-row scales ``weight_scb`` (float32); it computes in float16), for
every linear of the LM, as moshi's ``quantize=True`` does. Two sources:

* a q8 checkpoint (its keys include ``*.weight_scb``, as Kyutai's ``*-q8`` repositories): built as
  moshi builds it, loaded with the ``*_scb`` scales **kept float32**. moshi's own loader casts them to
  the LM dtype, which its ``QLinear`` then refuses ("Expected `weight_scb` to have type float");
  keeping them float32 is lossless;
* a float checkpoint (bf16, fp16, fp32): loaded, then each linear quantised on the target device.

``nf4`` (**experimental**: its effect on what the model says is unmeasured) replaces every linear of
the LM's two transformers (the temporal one and the depformer) with a bitsandbytes ``Linear4bit``
(NF4, blocks of 64, float16 compute) wrapped in :class:`NF4Linear`; embeddings, norms and the output
heads stay in the LM dtype. The wrapper is what moshi expects of a quantised linear: not an
``nn.Linear`` (moshi's gating would read ``.weight`` as a float matrix) but a ``QLinear`` (its
attention then keeps the KV cache in float16, the dtype of the projections' output).

The LM dtype of a quantised precision (embeddings, norms, heads) is bf16 on a GPU that has it, fp16 on
one that has not, fp32 on the CPU (:func:`voice_engine.models.loading.dtype_of`). For both precisions
the float weights are read on the CPU and each quantised linear is made on the target device, so the
GPU never holds the float model (NF4 7B loads within its 4.4 GiB of weights).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from moshi.models import loaders
from moshi.utils.quantize import QLinear
from torch import nn

from . import loading

QUANTIZED = ("q8", "nf4")
EXPERIMENTAL = ("nf4",)
NF4_BLOCKSIZE = 64
SCALE_SUFFIX = "_scb"


class NF4Linear(QLinear):
    """A bias-free linear as a bitsandbytes NF4 ``Linear4bit`` (float16 in, float16 out, as ``QLinear``)."""

    inner: Any  # bitsandbytes.nn.Linear4bit

    def __init__(self, linear: nn.Linear, device: torch.device) -> None:
        nn.Module.__init__(self)  # not QLinear's int8 quantisation
        import bitsandbytes  # noqa: PLC0415 - only the quantised precisions need it

        bnb: Any = bitsandbytes  # untyped

        if getattr(linear, "bias", None) is not None:
            raise loading.ModelDirError("nf4: a linear with a bias is not supported")
        inner = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=False,
            compute_dtype=torch.float16,
            quant_type="nf4",
            device="meta",
        )
        weight = linear.weight.detach().to(device=device, dtype=torch.float16)
        inner.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCKSIZE
        ).to(device)
        # bitsandbytes' optional CPU repacking (AVX512-BF16) fails on small layers; the CPU is for tests.
        inner.support_avx512bf16_for_cpu = False
        self.inner = inner
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]  # moshi reads a quantised linear's .weight.device
        weight: torch.Tensor = self.inner.weight
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.inner(x.half())
        return y


def is_quantized(precision: str) -> bool:
    return precision in QUANTIZED


def is_q8_state(keys: Iterable[str]) -> bool:
    """A q8 checkpoint: int8 weights with their ``*.weight_scb`` scales."""
    return any(key.endswith(SCALE_SUFFIX) for key in keys)


def _replace(module: nn.Module, make: Any) -> int:
    """Replace every ``nn.Linear`` under ``module`` by ``make(linear)``; how many were replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
            count += 1
        elif not isinstance(child, QLinear):
            count += _replace(child, make)
    return count


def _q8(linear: nn.Linear, device: torch.device) -> QLinear:
    if getattr(linear, "bias", None) is not None:
        raise loading.ModelDirError("q8: a linear with a bias is not supported (moshi's QLinear)")
    return QLinear(linear.to(device))


def quantize_q8(lm: nn.Module, device: torch.device) -> int:
    """Every linear of ``lm`` as moshi's ``QLinear`` (the layout of a q8 checkpoint), made on ``device``."""
    return _replace(lm, lambda linear: _q8(linear, device))


def quantize_nf4(lm: Any, device: torch.device) -> int:
    """Every linear of the LM's transformer and depformer as :class:`NF4Linear`, made on ``device``."""
    count = _replace(lm.transformer, lambda linear: NF4Linear(linear, device))
    if lm.depformer is not None:
        count += _replace(lm.depformer, lambda linear: NF4Linear(linear, device))
    return count


def state_device(precision: str, device: torch.device) -> str:
    """Where to read the checkpoint: the CPU for the quantised precisions (see the module docstring)."""
    return "cpu" if is_quantized(precision) else str(device)


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Float tensors to ``dtype``, except the int8 weights' ``*_scb`` scales: float32, as QLinear needs."""
    cast: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not value.dtype.is_floating_point:
            cast[key] = value
        else:
            cast[key] = value.float() if key.endswith(SCALE_SUFFIX) else value.to(dtype)
    return cast


def load_lm(
    lm_kwargs: dict[str, Any],
    state: dict[str, torch.Tensor],
    precision: str,
    device: torch.device,
    *,
    source: str,
    dtype: torch.dtype | None = None,
) -> Any:
    """Build moshi's ``LMModel`` from ``lm_kwargs``, load ``state`` strictly (consumed), quantise for
    ``precision``, and return it on ``device`` in eval mode. ``source`` names the weights in errors;
    ``dtype`` overrides the LM dtype of ``precision`` on ``device`` (tests: a bf16 q8 LM on the CPU)."""
    dtype = dtype or loading.dtype_of(precision, device)
    q8_state = is_q8_state(state)
    if q8_state and precision != "q8":
        raise loading.ModelDirError(
            f"{source}: an int8 (q8) checkpoint ({SCALE_SUFFIX} scales): serve it with precision q8"
        )
    kwargs = {k: v for k, v in lm_kwargs.items() if k != "quantize"} | {"quantize": q8_state}
    lm = loaders.get_moshi_lm(None, lm_kwargs=kwargs, device=torch.device("meta"), dtype=dtype)
    cast = cast_state(state, dtype)
    state.clear()
    try:
        lm.load_state_dict(cast, assign=True, strict=True)
    except RuntimeError as exc:
        raise loading.ModelDirError(f"{source}: does not fit config.json ({str(exc)[:300]})") from None
    del cast
    if precision == "q8" and not q8_state:
        quantize_q8(lm, device)
    elif precision == "nf4":
        quantize_nf4(lm, device)
    lm.to(device)
    if precision == "q8":
        bad = [n for n, p in lm.named_parameters() if n.endswith(SCALE_SUFFIX) and p.dtype != torch.float32]
        if bad:  # moshi's QLinear would refuse them at the first step
            raise loading.ModelDirError(f"{source}: q8 scales not float32 after loading: {bad[:3]}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    lm.eval()
    return lm


def describe(lm: Any) -> dict[str, int]:
    """How many linears of each kind ``lm`` has: ``q8``, ``nf4`` and ``float`` (tests, the bench)."""
    inner = {id(m.inner) for m in lm.modules() if isinstance(m, NF4Linear)}
    counts = {"q8": 0, "nf4": len(inner), "float": 0}
    for module in lm.modules():
        if isinstance(module, QLinear) and not isinstance(module, NF4Linear):
            counts["q8"] += 1
        elif isinstance(module, nn.Linear) and id(module) not in inner:
            counts["float"] += 1
    return counts
