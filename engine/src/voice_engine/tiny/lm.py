"""The LM settings every tiny set shares; each kind (stt, tts, chat) adds or overrides its own."""

from __future__ import annotations

from typing import Any

from . import mimi as tiny_mimi
from . import tokenizer as tiny_tokenizer

_BASE: dict[str, Any] = {
    "card": tiny_mimi.BINS,
    "dim": 32,
    "text_card": tiny_tokenizer.DEFAULT_VOCAB_SIZE,
    "existing_text_padding_id": 3,
    "num_heads": 2,
    "num_layers": 2,
    "hidden_scale": 2,
    "causal": True,
    "layer_scale": None,
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 32,
    "depformer_num_heads": 2,
    "depformer_num_layers": 1,
    "depformer_multi_linear": True,
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
}


def tiny_lm_kwargs(**kind: Any) -> dict[str, Any]:
    """The shared settings with ``kind``'s on top (a new dict each call: moshi edits some in place)."""
    return {**_BASE, **kind}
