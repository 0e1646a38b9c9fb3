"""A tiny Mimi codec with seeded, data-scaled codebooks (shared by the tiny STT and TTS sets).

A freshly constructed Mimi has all-zero codebooks (``embedding_sum`` zeros): every code is 0 and
decoding ignores the codes, so a test on it proves nothing about audio. :func:`build_mimi` therefore
encodes a fixed, seeded calibration signal (noise, tones, chirps, silence at several levels) with the
random encoder, and fills each residual codebook layer with centroids drawn from the latents (or the
residuals) that layer actually sees. Different input audio then gives different codes, and decoding
depends on the codes.

Sample rate (24 kHz), frame rate (12.5 Hz) and SEANet ratios ([8, 6, 5, 4]) are the real ones, so a
frame stays 1920 samples; every other dimension is shrunk.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from moshi.models import loaders
from safetensors.torch import save_file

MIMI_WEIGHTS_NAME = "mimi.safetensors"
MIMI_CONFIG_NAME = "mimi.json"
SAMPLE_RATE = 24000
FRAME_SIZE = 1920
BINS = 32
DEFAULT_N_Q = 4

_BASE_CONFIG: dict[str, Any] = {
    "sample_rate": SAMPLE_RATE,
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
        "n_q": DEFAULT_N_Q,
        "bins": BINS,
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

# Centroid values are rounded to this grid so that ulp-level differences between CPUs or thread
# counts in the calibration encode do not change the written bytes.
_GRID = 2.0**-12


@dataclass(frozen=True)
class MimiFiles:
    weights: Path
    config: Path


def mimi_config(n_q: int = DEFAULT_N_Q) -> dict[str, Any]:
    """The tiny Mimi's configuration (the ``mimi.json`` layout moshi's ``get_mimi`` reads)."""
    if not 2 <= n_q <= 64:
        raise ValueError(f"n_q {n_q} is outside 2..64 (one semantic codebook plus acoustic ones)")
    config = copy.deepcopy(_BASE_CONFIG)
    config["quantizer"]["n_q"] = n_q
    return config


def calibration_audio(seed: int, seconds: float = 1.2) -> torch.Tensor:
    """A fixed, seeded batch of signals ``[B, 1, T]`` that spans what tests feed the codec."""
    gen = torch.Generator().manual_seed(seed + 7919)
    n = round(seconds * SAMPLE_RATE / FRAME_SIZE) * FRAME_SIZE
    t = torch.arange(n, dtype=torch.float64) / SAMPLE_RATE
    rows: list[torch.Tensor] = [torch.zeros(n, dtype=torch.float64)]
    for level in (0.01, 0.1, 0.5):
        rows.append(level * torch.randn(n, generator=gen, dtype=torch.float64))
    for freq in (110.0, 440.0, 1500.0, 4000.0):
        rows.append(0.5 * torch.sin(2 * math.pi * freq * t))
    rows.append(0.4 * torch.sin(2 * math.pi * (100.0 + 1500.0 * t) * t))  # chirp
    # Bursts: noise gated on and off every few frames, so frames inside one signal differ too.
    gate = ((torch.arange(n) // (3 * FRAME_SIZE)) % 2).to(torch.float64)
    rows.append(0.3 * gate * torch.randn(n, generator=gen, dtype=torch.float64))
    return torch.stack(rows)[:, None, :].to(torch.float32)


def _seed_layers(layers: Any, data: torch.Tensor, gen: torch.Generator) -> None:
    """Fill each residual layer's codebook from ``data`` ``[N, D]`` (that layer's inputs)."""
    residual = data
    layer: Any
    for layer in layers:
        codebook: Any = layer._codebook
        bins = int(codebook.codebook_size)
        x = layer.project_in(residual)
        n = x.shape[0]
        picks = torch.randperm(n, generator=gen)[:bins]
        centroids = x[picks]
        if centroids.shape[0] < bins:
            extra = bins - centroids.shape[0]
            mean, std = x.mean(0), x.std(0).clamp(min=1e-3)
            centroids = torch.cat([centroids, mean + std * torch.randn(extra, x.shape[1], generator=gen)])
        # A little jitter, so that two identical data points never give two identical centroids.
        scale = x.std(0).clamp(min=1e-3)
        centroids = centroids + 0.05 * scale * torch.randn(centroids.shape, generator=gen)
        centroids = torch.round(centroids / _GRID) * _GRID
        codebook.embedding_sum.data.copy_(centroids)
        codebook.cluster_usage.data.fill_(1.0)
        codebook._initialized.data.fill_(1.0)
        codebook._buffers["_embedding"] = None  # drop the cached (zero) embedding
        codebook._cached_initialized = False
        codes = codebook.encode(x)
        residual = residual - layer.project_out(codebook.decode(codes))


def _convs(module: Any) -> list[Any]:
    return [m for m in module.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d))]


def _normalise(convs: list[Any], forward: Any, last_std: float) -> None:
    """Scale each conv (in forward order) so that its output has unit std on the calibration data.

    A default-initialised SEANet shrinks its input about threefold per layer, so a random decoder's
    output would not depend on its input at all (only on its biases). Biases are zeroed (silence in,
    silence out), then one forward pass with hooks rescales every layer as it runs (the data-driven
    "layer-sequential unit variance" initialisation); the very last conv gets ``last_std``.
    """
    handles = []
    for i, conv in enumerate(convs):
        target = last_std if i == len(convs) - 1 else 1.0

        def hook(mod: Any, _inp: Any, out: torch.Tensor, target: float = target) -> torch.Tensor:
            std = float(out.std())
            if not math.isfinite(std) or std < 1e-8:
                return out
            factor = target / std
            mod.weight.data.mul_(factor)
            if mod.bias is not None:
                mod.bias.data.mul_(factor)
            return out * factor

        if conv.bias is not None:
            conv.bias.data.zero_()
        handles.append(conv.register_forward_hook(hook))
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    for conv in convs:  # the grid again: same bytes whatever the CPU
        conv.weight.data.copy_(torch.round(conv.weight.data / _GRID) * _GRID)


@torch.no_grad()
def seed_codebooks(mimi: Any, seed: int) -> None:
    """Make ``mimi`` (a moshi ``MimiModel``, fp32, CPU) carry its input through to its output.

    Rescales the random encoder and decoder so that signals propagate (see :func:`_normalise`), and
    fills the codebooks from the encoder's own output on the calibration audio.
    """
    gen = torch.Generator().manual_seed(seed + 104729)
    audio = calibration_audio(seed)
    encoder_convs = _convs(mimi.encoder) + _convs(mimi.downsample)
    _normalise(encoder_convs, lambda: mimi._encode_to_unquantized_latent(audio), 1.0)
    emb = mimi._encode_to_unquantized_latent(audio)  # [B, D, T] at 12.5 Hz
    quantizer = mimi.quantizer
    for rvq in (quantizer.rvq_first, quantizer.rvq_rest):
        projected = rvq.input_proj(emb)  # [B, d, T]
        data = projected.transpose(1, 2).reshape(-1, projected.shape[1])
        _seed_layers(rvq.vq.layers, data, gen)
    codes = mimi.encode(audio)
    decoder_convs = _convs(mimi.upsample) + _convs(mimi.decoder)
    _normalise(decoder_convs, lambda: mimi.decode(codes), 0.1)


def build_mimi(seed: int, n_q: int = DEFAULT_N_Q, num_codebooks: int | None = None) -> Any:
    """A tiny random Mimi (moshi ``MimiModel``, CPU, fp32, eval) with seeded codebooks.

    ``num_codebooks`` (default ``n_q``) is how many codebooks it encodes to and decodes from.
    """
    torch.manual_seed(seed)
    mimi = loaders.get_mimi(None, mimi_config(n_q), device="cpu", num_codebooks=n_q)
    seed_codebooks(mimi, seed)
    mimi.set_num_codebooks(num_codebooks or n_q)
    return mimi


def save_mimi(mimi: Any, out: Path, n_q: int = DEFAULT_N_Q) -> MimiFiles:
    """Write a Mimi from :func:`build_mimi` as ``mimi.safetensors`` + ``mimi.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = MimiFiles(out / MIMI_WEIGHTS_NAME, out / MIMI_CONFIG_NAME)
    state = {k: v.detach().contiguous() for k, v in mimi.state_dict().items()}
    save_file(state, str(files.weights))
    files.config.write_text(json.dumps(mimi_config(n_q), indent=2) + "\n", encoding="utf-8")
    return files


def write_mimi(out: Path, seed: int, n_q: int = DEFAULT_N_Q) -> MimiFiles:
    """Build the tiny Mimi and write it into ``out`` (same seed, same bytes)."""
    return save_mimi(build_mimi(seed, n_q), out, n_q)


def load_mimi(files: MimiFiles, num_codebooks: int, device: str = "cpu") -> Any:
    """Load written files back through moshi's own loader (what the engine does)."""
    config = json.loads(files.config.read_text(encoding="utf-8"))
    return loaders.get_mimi(files.weights, config, device=device, num_codebooks=num_codebooks)
