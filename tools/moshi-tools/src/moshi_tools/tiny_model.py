"""Write a complete, offline, randomly initialised *tiny* Moshi model set.

The real ``moshi.server`` accepts the result: LM weights, a small Mimi codec, a sentencepiece
tokenizer and the LM config JSON. Everything is deterministic for a given seed. Nothing is
downloaded.

Usage::

    python -m moshi_tools.tiny_model --out DIR [--variant bf16|q8] [--seed 0]

The ``q8`` variant sets ``"quantize": true`` and stores a real LLM.int8 checkpoint (int8 weights and
float32 ``*_scb`` per-row scales), exactly the layout of Kyutai's ``*-pytorch-q8`` repositories.

The Mimi is made to carry audio: a freshly constructed Mimi has all-zero codebooks (every code is 0
and decoding ignores the codes) and a random SEANet shrinks its signal about threefold per layer. So
the encoder and decoder are rescaled layer by layer on a seeded calibration signal, and each codebook
gets centroids drawn from the latents (or residuals) its layer actually sees (:func:`seed_mimi`):
different audio gives different codes, and decoding depends on the codes. This module stays
self-contained (it also runs on target hosts, for ``moshi_tools.selftest``); the voice engine's
``voice_engine.tiny.mimi`` does the same for the engine's tiny sets.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

# File names inside a model set. ``config.json`` names the others, relative to its directory;
# moshi_tools.model_dir resolves them at start-up.
CONFIG_NAME = "config.json"
LM_NAME = "lm.safetensors"
MIMI_NAME = "mimi.safetensors"
MIMI_CONFIG_NAME = "mimi.json"
TOKENIZER_NAME = "tokenizer.model"

VOCAB_SIZE = 64

# Frames must stay 1920 samples at 24 kHz (12.5 Hz), so sample rate, frame rate and SEANet ratios
# are the real ones; everything else is shrunk.
MIMI_CONFIG: dict[str, Any] = {
    "sample_rate": 24000,
    "channels": 1,
    "frame_rate": 12.5,
    "seanet": {
        "channels": 1,
        "dimension": 32,
        "causal": True,
        "n_filters": 4,
        "n_residual_layers": 1,
        "activation": "ELU",
        "compress": 2,
        "dilation_base": 2,
        "disable_norm_outer_blocks": 0,
        "kernel_size": 7,
        "residual_kernel_size": 3,
        "last_kernel_size": 3,
        "norm": "none",
        "pad_mode": "constant",
        "ratios": [8, 6, 5, 4],
        "true_skip": True,
    },
    "quantizer": {
        "dimension": 16,
        "n_q": 4,
        "bins": 32,
        "input_dimension": 32,
        "output_dimension": 32,
    },
    "transformer": {
        "d_model": 32,
        "num_heads": 2,
        "num_layers": 1,
        "causal": True,
        "layer_scale": 0.01,
        "context": 16,
        "conv_layout": True,
        "max_period": 10000,
        "gating": "none",
        "norm": "layer_norm",
        "positional_embedding": "rope",
        "dim_feedforward": 64,
        "input_dimension": 32,
        "output_dimensions": [32],
    },
}

LM_CONFIG: dict[str, Any] = {
    "dim": 32,
    "text_card": VOCAB_SIZE,
    "existing_text_padding_id": 3,
    "n_q": 4,
    "dep_q": 2,
    "card": MIMI_CONFIG["quantizer"]["bins"],
    "num_heads": 2,
    "num_layers": 2,
    "hidden_scale": 2,
    "causal": True,
    "layer_scale": None,
    "context": 32,
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 32,
    "depformer_dim_feedforward": 64,
    "depformer_num_heads": 2,
    "depformer_num_layers": 1,
    "depformer_layer_scale": None,
    "depformer_multi_linear": True,
    "depformer_context": 4,
    "depformer_max_period": 10000,
    "depformer_gating": "silu",
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 0, 1],
}

LM_GEN_CONFIG = {"top_k": 10, "top_k_text": 10}

FRAME_SIZE = 1920
# Seeded values are rounded to this grid, so that ulp-level differences between CPUs or thread
# counts in the calibration passes do not change the written bytes.
_GRID = 2.0**-12

_WORDS = [
    "hello",
    "moshi",
    "this",
    "is",
    "a",
    "tiny",
    "model",
    "for",
    "tests",
    "it",
    "speaks",
    "random",
    "words",
    "about",
    "the",
    "weather",
    "the",
    "bridge",
    "the",
    "server",
    "and",
    "the",
    "voice",
    "page",
    "morning",
    "evening",
    "night",
    "coffee",
    "tea",
    "music",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "yes",
    "no",
    "maybe",
    "thanks",
    "please",
]


def lm_config(variant: str) -> dict[str, Any]:
    """The full ``config.json`` content for a variant (``bf16`` or ``q8``)."""
    config = dict(LM_CONFIG)
    config.update(
        moshi_name=LM_NAME,
        mimi_name=MIMI_NAME,
        tokenizer_name=TOKENIZER_NAME,
        mimi_config_name=MIMI_CONFIG_NAME,
        lm_gen_config=LM_GEN_CONFIG,
    )
    if variant == "q8":
        config["quantize"] = True
    return config


def _write_tokenizer(out: Path, seed: int) -> None:
    import io

    import sentencepiece as spm

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(12)) for _ in range(400)]
    model = io.BytesIO()
    # Trained from an iterator into memory, so the model records no file paths: the bytes depend
    # on the seed alone.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=VOCAB_SIZE,
        model_type="unigram",
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    (out / TOKENIZER_NAME).write_bytes(model.getvalue())


def _calibration_audio(torch: Any, seed: int, seconds: float = 1.2) -> Any:
    """A fixed batch ``[B, 1, T]`` of silence, noise, tones, a chirp and noise bursts."""
    import math

    gen = torch.Generator().manual_seed(seed + 7919)
    n = round(seconds * 24000 / FRAME_SIZE) * FRAME_SIZE
    t = torch.arange(n, dtype=torch.float64) / 24000
    rows = [torch.zeros(n, dtype=torch.float64)]
    rows += [level * torch.randn(n, generator=gen, dtype=torch.float64) for level in (0.01, 0.1, 0.5)]
    rows += [0.5 * torch.sin(2 * math.pi * f * t) for f in (110.0, 440.0, 1500.0, 4000.0)]
    rows.append(0.4 * torch.sin(2 * math.pi * (100.0 + 1500.0 * t) * t))
    gate = ((torch.arange(n) // (3 * FRAME_SIZE)) % 2).to(torch.float64)
    rows.append(0.3 * gate * torch.randn(n, generator=gen, dtype=torch.float64))
    return torch.stack(rows)[:, None, :].to(torch.float32)


def _rescale_layers(torch: Any, module: Any, forward: Any, last_std: float) -> None:
    """Zero the conv biases and scale each conv, in forward order, to unit output std (LSUV)."""
    convs = [m for m in module.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d))]
    handles = []
    for i, conv in enumerate(convs):
        target = last_std if i == len(convs) - 1 else 1.0

        def hook(mod: Any, _inputs: Any, out: Any, target: float = target) -> Any:
            std = float(out.std())
            if not std > 1e-8:
                return out
            mod.weight.data.mul_(target / std)
            if mod.bias is not None:
                mod.bias.data.mul_(target / std)
            return out * (target / std)

        if conv.bias is not None:
            conv.bias.data.zero_()
        handles.append(conv.register_forward_hook(hook))
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    for conv in convs:
        conv.weight.data.copy_(torch.round(conv.weight.data / _GRID) * _GRID)


def _seed_codebooks(torch: Any, rvq: Any, latent: Any, gen: Any) -> None:
    """Centroids for each residual layer of ``rvq``, drawn from what that layer sees."""
    projected = rvq.input_proj(latent)
    residual = projected.transpose(1, 2).reshape(-1, projected.shape[1])
    for layer in rvq.vq.layers:
        book = layer._codebook
        x = layer.project_in(residual)
        picks = torch.randperm(x.shape[0], generator=gen)[: book.codebook_size]
        centroids = x[picks]
        if centroids.shape[0] < book.codebook_size:
            extra = book.codebook_size - centroids.shape[0]
            spread = x.std(0).clamp(min=1e-3)
            centroids = torch.cat(
                [centroids, x.mean(0) + spread * torch.randn(extra, x.shape[1], generator=gen)]
            )
        centroids = centroids + 0.05 * x.std(0).clamp(min=1e-3) * torch.randn(centroids.shape, generator=gen)
        book.embedding_sum.data.copy_(torch.round(centroids / _GRID) * _GRID)
        book.cluster_usage.data.fill_(1.0)
        book._initialized.data.fill_(1.0)
        book._buffers["_embedding"] = None  # drop the cached all-zero embedding
        book._cached_initialized = False
        residual = residual - layer.project_out(book.decode(book.encode(x)))


def seed_mimi(mimi: Any, seed: int) -> None:
    """Make a random Mimi (fp32, CPU) carry its input: propagating layers, data-scaled codebooks."""
    import torch

    gen = torch.Generator().manual_seed(seed + 104729)
    audio = _calibration_audio(torch, seed)
    with torch.no_grad():
        encoder = torch.nn.ModuleList([mimi.encoder, mimi.downsample])
        _rescale_layers(torch, encoder, lambda: mimi._encode_to_unquantized_latent(audio), 1.0)
        latent = mimi._encode_to_unquantized_latent(audio)
        _seed_codebooks(torch, mimi.quantizer.rvq_first, latent, gen)
        _seed_codebooks(torch, mimi.quantizer.rvq_rest, latent, gen)
        codes = mimi.encode(audio)
        decoder = torch.nn.ModuleList([mimi.upsample, mimi.decoder])
        _rescale_layers(torch, decoder, lambda: mimi.decode(codes), 0.1)


def write_model_set(out: Path, variant: str = "bf16", seed: int = 0) -> Path:
    """Write the model set for ``variant`` into ``out`` and return ``out``."""
    if variant not in ("bf16", "q8"):
        raise ValueError(f"unknown variant {variant!r}: choose bf16 or q8")
    import torch
    from moshi.models import loaders
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = lm_config(variant)
    torch.manual_seed(seed)
    mimi = loaders.get_mimi(None, MIMI_CONFIG, num_codebooks=LM_CONFIG["n_q"], device="cpu")
    seed_mimi(mimi, seed)
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(out / MIMI_NAME))
    lm_kwargs = {k: v for k, v in LM_CONFIG.items()}
    if variant == "q8":
        lm_kwargs["quantize"] = True
    lm = loaders.get_moshi_lm(None, lm_kwargs=lm_kwargs, device="cpu", dtype=torch.bfloat16)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(out / LM_NAME))
    _write_tokenizer(out, seed)
    (out / MIMI_CONFIG_NAME).write_text(json.dumps(MIMI_CONFIG, indent=2) + "\n", encoding="utf-8")
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write the model set to")
    parser.add_argument("--variant", choices=("bf16", "q8"), default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        write_model_set(args.out, args.variant, args.seed)
    except ImportError as exc:
        print(f"tiny_model: {exc}; run it with a Python that has moshi installed", file=sys.stderr)
        return 2
    print(f"wrote {args.variant} tiny model set to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
