"""Per-slot reproducible sampling: moshi's temperature/top-k distribution, one random stream per slot."""

from __future__ import annotations

import math

import pytest
import torch
from moshi.models.lm import LMModel

from voice_engine.models.sampling import SamplingParams, SlotLMGen, SlotSampler


def _sampler(slots: int = 3, k: int = 4, codebooks: int = 2, card: int = 8) -> SlotSampler:
    return SlotSampler(slots, codebooks=codebooks, card=card, text_card=card, max_top_k=k, max_top_k_text=k)


def _params(seed: int, temp: float = 1.0, top_k: int = 4) -> SamplingParams:
    return SamplingParams(seed=seed, temp=temp, temp_text=temp, top_k=top_k, top_k_text=top_k)


LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0, 0.0, -2.0, 1.5])


def test_distribution_is_moshis_top_k_with_temperature():
    sampler = _sampler(slots=1, k=3)
    sampler.reset(0, _params(1, temp=0.7, top_k=3))
    counts = torch.zeros(8)
    n = 6000
    for _ in range(n):
        sampler.prepare([0])
        counts[int(sampler.sample_text(LOGITS[None]))] += 1
    top = torch.topk(LOGITS, 3)
    expected = torch.zeros(8)
    expected[top.indices] = torch.softmax(top.values / 0.7, -1)
    assert counts[expected == 0].sum() == 0, "a token outside the top-k was sampled"
    assert (counts / n - expected).abs().max() < 0.03


def test_temperature_zero_is_greedy_and_draws_no_noise():
    sampler = _sampler(slots=1)
    sampler.reset(0, _params(1, temp=0.0))
    for _ in range(20):
        sampler.prepare([0])
        assert int(sampler.sample_text(LOGITS[None])) == 4
        assert float(sampler.text_noise.abs().sum()) == 0.0


def test_per_slot_top_k_masks_the_higher_ranks():
    sampler = _sampler(slots=2, k=4)
    sampler.reset(0, _params(1, temp=5.0, top_k=1))
    sampler.reset(1, _params(1, temp=5.0, top_k=4))
    seen: set[int] = set()
    for _ in range(200):
        sampler.prepare([0, 1])
        tokens = sampler.sample_text(torch.stack([LOGITS, LOGITS]))
        assert int(tokens[0]) == 4
        seen.add(int(tokens[1]))
    assert seen == {4, 0, 7, 1}  # the top 4


def _stream(
    sampler: SlotSampler, slot: int, steps: int, others: dict[int, set[int]]
) -> list[tuple[int, ...]]:
    """``slot``'s text and audio tokens over ``steps`` steps; ``others[step]`` also execute then."""
    out = []
    logits = torch.randn(sampler.slots, 8, generator=torch.Generator().manual_seed(5))
    for step in range(steps):
        sampler.prepare(sorted({slot} | others.get(step, set())))
        text = sampler.sample_text(logits)
        audio = [sampler.sample_audio(logits, cb) for cb in range(sampler.codebooks)]
        out.append((int(text[slot]), *(int(a[slot]) for a in audio)))
    return out


def test_a_slots_samples_do_not_depend_on_its_neighbours():
    alone = _sampler()
    alone.reset(1, _params(7))
    busy = _sampler()
    busy.reset(0, _params(3))
    busy.reset(1, _params(7))
    busy.reset(2, _params(9))
    others = {s: {0, 2} if s % 2 else {0} for s in range(30)}
    assert _stream(alone, 1, 30, {}) == _stream(busy, 1, 30, others)


def test_reset_replays_and_seeds_differ():
    sampler = _sampler()
    sampler.reset(0, _params(11))
    first = _stream(sampler, 0, 20, {})
    sampler.reset(0, _params(11))
    assert _stream(sampler, 0, 20, {}) == first
    sampler.reset(0, _params(12))
    assert _stream(sampler, 0, 20, {}) != first


def test_masked_slots_draw_nothing():
    sampler = _sampler()
    sampler.reset(0, _params(4))
    sampler.reset(1, _params(5))
    reference = _stream(sampler, 1, 10, {})
    sampler.reset(1, _params(5))
    for _ in range(7):  # slot 0 steps alone: slot 1's stream must not move
        sampler.prepare([0])
    assert _stream(sampler, 1, 10, {}) == reference


def test_stepping_a_slot_that_was_never_reset_is_an_error():
    sampler = _sampler()
    with pytest.raises(RuntimeError, match="before its sampler was reset"):
        sampler.prepare([2])


def _tiny_lm() -> LMModel:
    torch.manual_seed(0)
    lm = LMModel(
        delays=[0, 0, 1],
        n_q=2,
        dep_q=2,
        card=16,
        text_card=20,
        dim=16,
        num_heads=2,
        num_layers=1,
        hidden_scale=2,
        context=20,
        depformer_dim=16,
        depformer_num_heads=2,
        depformer_num_layers=1,
        depformer_multi_linear=True,
        depformer_weights_per_step=True,
        positional_embedding="rope",
        gating="silu",
        norm="rms_norm_f32",
    )
    lm.eval()
    return lm


def _lm_tokens(busy: bool, steps: int = 12) -> list[list[int]]:
    lm = _tiny_lm()
    sampler = SlotSampler(3, codebooks=2, card=16, text_card=20, max_top_k=8, max_top_k_text=8)
    gen = SlotLMGen(lm, sampler, temp=1.0, temp_text=1.0, top_k=8, top_k_text=8, support_out_of_sync=True)
    gen.streaming_forever(3)
    for slot, seed in enumerate((1, 2, 3)):
        sampler.reset(slot, _params(seed, temp=1.0, top_k=8))
    gen.reset_streaming(torch.ones(3, dtype=torch.bool))
    rows = []
    tokens = torch.zeros(3, 0, 1, dtype=torch.long)
    for step in range(steps):
        executing = [1, 0, 2] if busy and step % 3 else [1]
        mask = torch.zeros(3, dtype=torch.bool)
        mask[executing] = True
        sampler.prepare(executing)
        gen.set_exec_mask(mask)
        frame = gen.step(tokens)
        assert frame is not None
        rows.append(frame[1, :, 0].tolist())
    return rows


def test_slot_lmgen_rows_do_not_depend_on_neighbours():
    alone = _lm_tokens(busy=False)
    assert alone == _lm_tokens(busy=True)
    assert len({tuple(r) for r in alone}) > 3  # it does sample


def test_slot_lmgen_refuses_batch_doubling_cfg():
    sampler = _sampler()
    with pytest.raises(ValueError, match="cfg_coef"):
        SlotLMGen(_tiny_lm(), sampler, cfg_coef=2.0)


def test_gumbel_noise_is_finite():
    sampler = _sampler(slots=1)
    sampler.reset(0, _params(0))
    for _ in range(50):
        sampler.prepare([0])
        assert all(math.isfinite(float(x)) for x in sampler.audio_noise.flatten())
