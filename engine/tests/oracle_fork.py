"""The fork's side of the PersonaPlex oracle test (``test_chat_oracle.py``), run in its own process.

Usage: ``python oracle_fork.py SRC REQUEST.json RESULT.pt``. ``SRC`` is the directory of NVIDIA's fork
that holds its ``moshi`` package (``<checkout>/moshi``); it goes first on ``sys.path``, so ``moshi``
here is the fork's package, never PyPI's (nor this project's engine, which is not imported).

For each case of the request it does what the fork's ``server.py`` does for one connection, with the
fork's own classes on the tiny set's weights: ``LMModel`` (strict loading), ``MimiModel``, ``LMGen``
(greedy), ``load_voice_prompt`` / ``load_voice_prompt_embeddings``, ``step_system_prompts``, then one
``mimi.encode`` and ``lm_gen.step`` per user frame. It records the text logits of every model call,
the user codes, the voice codes and the tokens ``step`` returns, and saves them with ``torch.save``.

Substitutions, each because the fork hard-codes the 7B model: ``AUDIO_TOKENS_PER_STREAM`` (8 there)
becomes the tiny set's codebooks per stream, and the silence and sine frame codes (the real Mimi's)
become the tiny set's (``config.json`` ``personaplex``). The tiny set's weights are stored in PyPI
moshi's key layout; they are regrouped into the fork's (:func:`_fork_layout`). ``server.py`` runs
its ``main()`` when imported, so its ``wrap_with_system_tags`` is compiled alone from its source. An
empty text prompt makes the fork iterate over ``None`` (a crash); here it is given as no tokens.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece
import torch
from safetensors.torch import load_file

_PER_STEP_KEY = re.compile(r"^(.*\.self_attn\.)(in_projs|out_projs)\.(\d+)\.weight$")


def _wrap_function(src: Path) -> Any:
    """The fork's ``wrap_with_system_tags``, compiled from ``server.py`` without running the module."""
    tree = ast.parse((src / "moshi" / "server.py").read_text(encoding="utf-8"))
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "wrap_with_system_tags"]
    if len(funcs) != 1:
        raise SystemExit("server.py has no wrap_with_system_tags")
    namespace: dict[str, Any] = {}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), "server.py", "exec"), namespace)
    return namespace["wrap_with_system_tags"]


def _fork_layout(state: dict[str, Any]) -> dict[str, Any]:
    """PyPI moshi's per-step attention keys (``in_projs.{i}.weight``) stacked into the fork's
    (``in_proj_weight``, ``out_proj.weight``: the steps' weights one after another, the layout of
    the released checkpoints). No value changes."""
    out: dict[str, Any] = {}
    groups: dict[str, dict[int, Any]] = {}
    for key, value in state.items():
        match = _PER_STEP_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        prefix, kind, step = match.groups()
        target = prefix + ("in_proj_weight" if kind == "in_projs" else "out_proj.weight")
        groups.setdefault(target, {})[int(step)] = value
    for target, steps in groups.items():
        out[target] = torch.cat([steps[i] for i in range(len(steps))], dim=0)
    return out


def main() -> None:
    src, request_path, result_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    sys.path.insert(0, str(src))
    # The fork's package, importable only now (it is first on sys.path).
    import moshi  # noqa: PLC0415
    from moshi.models import MimiModel, lm  # noqa: PLC0415
    from moshi.modules import SEANetDecoder, SEANetEncoder, transformer  # noqa: PLC0415
    from moshi.quantization import SplitResidualVectorQuantizer  # noqa: PLC0415

    if not Path(moshi.__file__).resolve().is_relative_to(src.resolve()):
        raise SystemExit(f"imported moshi from {moshi.__file__}, not from {src}")
    torch.set_num_threads(1)
    request = json.loads(request_path.read_text(encoding="utf-8"))
    per_stream = int(request["lm_kwargs"]["n_q"]) // 2
    lm.AUDIO_TOKENS_PER_STREAM = per_stream
    silence = torch.tensor(request["silence_tokens"], dtype=torch.long).view(1, per_stream, 1)
    sine = torch.tensor(request["sine_tokens"], dtype=torch.long).view(1, per_stream, 1)

    model = lm.LMModel(device="cpu", dtype=torch.float32, **request["lm_kwargs"])
    model.load_state_dict(_fork_layout(load_file(request["lm_weights"])), strict=True)
    model.eval()

    cfg = request["mimi_config"]
    encoder = SEANetEncoder(**cfg["seanet"])
    mimi = MimiModel(
        encoder,
        SEANetDecoder(**cfg["seanet"]),
        SplitResidualVectorQuantizer(**cfg["quantizer"]),
        channels=cfg["channels"],
        sample_rate=cfg["sample_rate"],
        frame_rate=cfg["frame_rate"],
        encoder_frame_rate=cfg["sample_rate"] / encoder.hop_length,
        causal=True,
        resample_method="conv",
        encoder_transformer=transformer.ProjectedTransformer(device="cpu", **cfg["transformer"]),
        decoder_transformer=transformer.ProjectedTransformer(device="cpu", **cfg["transformer"]),
    )
    mimi.load_state_dict(_fork_layout(load_file(request["mimi_weights"])), strict=True)
    mimi.eval()
    mimi.set_num_codebooks(per_stream)

    tokenizer = sentencepiece.SentencePieceProcessor(model_file=request["tokenizer"])
    wrap = _wrap_function(src)

    def new_gen(save_embeddings: bool = False) -> Any:
        # As server.py's ServerState, greedy.
        gen = lm.LMGen(
            model,
            audio_silence_frame_cnt=int(0.5 * mimi.frame_rate),
            sample_rate=mimi.sample_rate,
            device="cpu",
            frame_rate=mimi.frame_rate,
            save_voice_prompt_embeddings=save_embeddings,
            use_sampling=False,
        )
        gen._encode_zero_frame = silence.clone
        gen._encode_sine_frame = sine.clone
        return gen

    logits: list[torch.Tensor] = []
    model.text_linear.register_forward_hook(lambda _m, _i, out: logits.append(out[0, 0].detach().clone()))
    frame = int(mimi.sample_rate / mimi.frame_rate)
    gen = new_gen()
    voice_codes: list[torch.Tensor] = []
    encode_frames = gen._encode_voice_prompt_frames

    def recording(m: Any) -> Any:
        for codes in encode_frames(m):
            voice_codes.append(codes[0, :, 0].clone())
            yield codes

    gen._encode_voice_prompt_frames = recording
    results: dict[str, Any] = {
        "probe_tokens": {text: tokenizer.encode(wrap(text)) for text in request["probe_texts"]},
        "cases": {},
    }
    with torch.no_grad():
        mimi.streaming_forever(1)
        gen.streaming_forever(1)
        for case in request["cases"]:
            mimi.reset_streaming()
            gen.reset_streaming()
            voice = case["voice"]
            if voice is None:
                gen.voice_prompt_audio = gen.voice_prompt_embeddings = gen.voice_prompt_cache = None
            elif voice.endswith(".pt"):
                gen.load_voice_prompt_embeddings(voice)
            else:
                gen.load_voice_prompt(voice)
            text = case["text"]
            gen.text_prompt_tokens = tokenizer.encode(wrap(text)) if text else []
            voice_codes.clear()
            logits.clear()
            gen.step_system_prompts(mimi)
            prompt_calls = len(logits)
            mimi.reset_streaming()
            user_codes, tokens = [], []
            pcm = np.load(case["user_pcm"])
            for i in range(pcm.shape[0]):
                chunk = torch.from_numpy(pcm[i].astype(np.float32)).view(1, 1, frame)
                codes = mimi.encode(chunk)
                user_codes.append(codes[0, :, 0].clone())
                out = gen.step(codes[:, :, 0:1])
                tokens.append(out[0, :, 0].clone())
            results["cases"][case["name"]] = {
                "text_tokens": list(gen.text_prompt_tokens),
                "prompt_calls": prompt_calls,
                "logits": torch.stack(logits),
                "voice_codes": torch.stack(voice_codes) if voice_codes else None,
                "user_codes": torch.stack(user_codes),
                "tokens": torch.stack(tokens),
            }
        saved = request.get("save_pt_from")
        if saved:
            # The fork's own .pt for a WAV prompt: it writes it next to the audio file.
            with tempfile.TemporaryDirectory() as tmp:
                wav = Path(tmp) / Path(saved).name
                shutil.copy(saved, wav)
                saver = new_gen(save_embeddings=True)
                saver.streaming_forever(1)
                mimi.reset_streaming()
                saver.load_voice_prompt(str(wav))
                saver._step_voice_prompt(mimi)
                results["saved_pt"] = torch.load(str(wav.with_suffix(".pt")), weights_only=True)
    torch.save(results, str(result_path))


if __name__ == "__main__":
    main()
