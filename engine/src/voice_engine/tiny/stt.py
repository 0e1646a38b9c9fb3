"""A tiny STT-shaped model set: the layout of Kyutai's ``kyutai/stt-*`` Hugging Face repositories.

The LM has ``dep_q = 0`` (audio codebooks in, text out, no depformer), all delays 0, and extra heads
for pause prediction (``kyutai/stt-1b-en_fr`` has four semantic-VAD heads of dimension 6). The
``config.json`` carries what moshi's ``loaders.CheckpointInfo`` reads: the model kwargs plus
``moshi_name``, ``mimi_name``, ``tokenizer_name``, ``model_type`` ``"stt"``, ``lm_gen_config`` and
``stt_config`` (``audio_delay_seconds``, ``audio_silence_prefix_seconds``); it also names the tiny
Mimi's own configuration (``mimi_config_name``), which a real repository leaves out (default Mimi).

Same seed, same bytes. Usage: ``voice-engine tiny-model --kind stt --out DIR [--seed N]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sentencepiece
import torch
from moshi.models import loaders
from moshi.models.lm import LMGen
from safetensors.torch import save_file

from . import mimi as tiny_mimi
from . import tokenizer as tiny_tokenizer
from .lm import tiny_lm_kwargs

CONFIG_NAME = "config.json"
LM_NAME = "model.safetensors"
N_Q = 4
VOCAB_SIZE = tiny_tokenizer.DEFAULT_VOCAB_SIZE
EXTRA_HEADS = 4
EXTRA_HEADS_DIM = 6

LM_KWARGS: dict[str, Any] = tiny_lm_kwargs(
    n_q=N_Q,
    dep_q=0,
    delays=[0] * (N_Q + 1),
    context=64,
    depformer_dim_feedforward=None,
    extra_heads_num_heads=EXTRA_HEADS,
    extra_heads_dim=EXTRA_HEADS_DIM,
)

STT_CONFIG: dict[str, float] = {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0}
LM_GEN_CONFIG: dict[str, Any] = {"temp": 0.0, "temp_text": 0.0, "top_k": 250, "top_k_text": 50}


def config(seed: int) -> dict[str, Any]:
    """The ``config.json`` content."""
    return {
        **LM_KWARGS,
        "model_id": {"sig": f"tiny-stt-seed{seed}", "epoch": 0},
        "lm_gen_config": LM_GEN_CONFIG,
        "stt_config": STT_CONFIG,
        "model_type": "stt",
        "moshi_name": LM_NAME,
        "mimi_name": tiny_mimi.MIMI_WEIGHTS_NAME,
        "mimi_config_name": tiny_mimi.MIMI_CONFIG_NAME,
        "tokenizer_name": tiny_tokenizer.TOKENIZER_NAME,
    }


# Target shares of the text stream on the calibration audio: PAD between words, EPAD before words.
PAD_SHARE = 0.45
EPAD_SHARE = 0.15


def _share(logits: Any, token: int) -> float:
    return float((logits.argmax(-1) == token).double().mean())


def _bisect(make_logits: Any, token: int, target: float) -> float:
    lo, hi = 0.0, 64.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if _share(make_logits(mid), token) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _hidden_states(lm: Any, codes: Any) -> Any:
    """The main transformer's outputs ``[N, dim]`` over ``codes`` with greedy text fed back."""
    gen = LMGen(lm, use_sampling=False, support_out_of_sync=True)
    batch, _, steps = codes.shape
    rows = []
    with gen.streaming(batch):
        for t in range(steps):
            result = gen._step(codes[:, :, t : t + 1])
            assert result is not None
            rows.append(result[1][:, 0])
    return torch.cat(rows).double()


def shape_text_head(lm: Any, mimi: Any, pieces: list[str], seed: int) -> None:
    """Make the random LM's greedy text stream look like an STT's: PAD, EPAD and whole words.

    A random text head picks the same few tokens everywhere (rarely PAD or EPAD), so no word would
    ever end. So: the text embedding is damped (the audio, not the fed-back text, drives the state),
    whole-word rows get one norm and other pieces (letters, a bare "\u2581") are damped; then, on the
    main transformer's outputs over the Mimi codes of the calibration audio (greedy text fed back),
    with ``u`` their mean direction and ``v`` their top principal direction, PAD's row becomes
    ``alpha * u`` and EPAD's ``beta * v``, with ``alpha`` and ``beta`` chosen so that PAD wins about
    45 % and EPAD about 15 % of the frames.
    Refitted a few rounds, since the fed-back text changes with the rows. Last, PAD's input
    embedding is pushed towards EPAD's row, so that an EPAD tends to follow PADs.
    """
    grid = 2.0**-12
    with torch.no_grad():
        codes = mimi.encode(tiny_mimi.calibration_audio(seed, seconds=2.4))  # [B, n_q, T]
        lm.text_emb.weight.mul_(0.3)
        weight = lm.text_linear.weight
        words = [i for i, p in enumerate(pieces) if i >= 4 and p.startswith("\u2581") and p != "\u2581"]
        norm = weight[words].norm(dim=1).mean()
        for i in range(weight.shape[0]):
            if i in words:
                weight[i].mul_(norm / weight[i].norm())
            else:
                weight[i].mul_(0.25)
        weight[1].zero_()
        weight[2].zero_()
        for _ in range(3):
            flat = _hidden_states(lm, codes)
            direction = flat.mean(0)
            direction = direction / direction.norm()
            centred = flat - flat.mean(0)
            # The top principal direction of what varies with the audio (power iteration: same
            # numbers on every machine, unlike an SVD routine's sign choice).
            spread = torch.ones(flat.shape[1], dtype=torch.float64)
            for _ in range(50):
                spread = centred.T @ (centred @ spread)
                spread = spread / spread.norm()
            base = flat @ weight.double().T
            proj = flat @ direction
            varying = flat @ spread
            base[:, 1] = base[:, 2] = -1e9

            def with_rows(
                alpha: float, beta: float, base: Any = base, proj: Any = proj, varying: Any = varying
            ) -> Any:
                logits = base.clone()
                logits[:, 3] = alpha * proj
                logits[:, 0] = beta * varying
                return logits

            alpha = beta = 1.0
            for _ in range(2):
                alpha = _bisect(lambda a, beta=beta: with_rows(a, beta), 3, PAD_SHARE)
                beta = _bisect(lambda b, alpha=alpha: with_rows(alpha, b), 0, EPAD_SHARE)
            weight[3] = (alpha * direction).float()
            weight[0] = (beta * spread).float()
        # A PAD read back pulls the next token towards EPAD: the PAD ... EPAD word ... rhythm of a
        # real STT stream, so words get ended (EndWord) on any kind of audio.
        lm.text_emb.weight[3] += 3.0 * weight[0] / weight[0].norm()
        lm.text_emb.weight.copy_(torch.round(lm.text_emb.weight / grid) * grid)
        weight.copy_(torch.round(weight / grid) * grid)


SILENCE_EMB_NORM = 10.0
SILENCE_PAD_GAIN = 2.0
SILENCE_PAUSE_GAIN = 3.0


def shape_silence(lm: Any, mimi: Any, seed: int) -> None:
    """Silence reads as silence: no words, and the pause heads say "pause".

    Mimi's codes for digital silence (after a few frames of it) get one shared, large input
    embedding along a seeded direction ``v``; PAD's row gains ``v`` and every extra head's class 0
    (what Kyutai's server reports in ``prs``) becomes ``v``. So during silence the text stream is PAD
    and ``prs`` goes to about 1 within half a second, while on sound ``prs`` stays lower and words
    come: a bridge's turn-taking on the pause prediction works on the tiny model.
    """
    gen = torch.Generator().manual_seed(seed + 211)
    with torch.no_grad():
        with mimi.streaming(1):
            for _ in range(8):
                silent = mimi.encode(torch.zeros(1, 1, tiny_mimi.FRAME_SIZE))
        direction = torch.randn(lm.dim, generator=gen, dtype=torch.float64)
        direction = (direction / direction.norm()).float()
        for k, code in enumerate(silent[0, :, 0].tolist()):
            lm.emb[k].weight[code] = SILENCE_EMB_NORM * direction
        lm.text_linear.weight[3] += SILENCE_PAD_GAIN * direction
        for head in lm.extra_heads:
            head.weight[0] = SILENCE_PAUSE_GAIN * direction
        grid = 2.0**-12
        for param in (
            *(e.weight for e in lm.emb),
            lm.text_linear.weight,
            *(h.weight for h in lm.extra_heads),
        ):
            param.copy_(torch.round(param / grid) * grid)


def make(out: Path, seed: int = 0) -> Path:
    """Write the tiny STT model set into ``out`` and return ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    codec = tiny_mimi.build_mimi(seed, N_Q)
    tiny_mimi.save_mimi(codec, out, N_Q)
    tiny_tokenizer.write_tokenizer(out, seed, VOCAB_SIZE)
    torch.manual_seed(seed)
    lm = loaders.get_moshi_lm(None, lm_kwargs=dict(LM_KWARGS), device="cpu", dtype=torch.float32)
    lm.eval()
    sp = sentencepiece.SentencePieceProcessor(str(out / tiny_tokenizer.TOKENIZER_NAME))
    pieces = [sp.id_to_piece(i) for i in range(VOCAB_SIZE)]
    shape_text_head(lm, codec, pieces, seed)
    shape_silence(lm, codec, seed)
    state = {k: v.detach().contiguous() for k, v in lm.state_dict().items()}
    save_file(state, str(out / LM_NAME))
    (out / CONFIG_NAME).write_text(json.dumps(config(seed), indent=2) + "\n", encoding="utf-8")
    return out
