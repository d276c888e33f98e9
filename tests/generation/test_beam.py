"""Beam search equals transformers' beam search on the same weights."""

from __future__ import annotations

import pytest
import torch

from lmforge.checkpoint.load import load_model
from lmforge.generation.beam import beam_generate, beam_search
from lmforge.generation.generate import generate_ids
from lmforge.generation.sampling import SamplingParams

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=64, max_position_embeddings=128)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("beam")
    ref.save_pretrained(path)
    return ref, load_model(path)


@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, False), (0.0, True), (2.0, "never"), (-1.0, False)])
def test_beam_search_equals_transformers(pair, length_penalty, early_stopping):
    ref, ours = pair
    for seed in range(3):
        torch.manual_seed(seed)
        prompt = torch.randint(0, 64, (1, 6))
        greedy = generate_ids(ours, [prompt[0].tolist()], SamplingParams(max_new_tokens=8, temperature=0))[0]
        eos = greedy[2]  # a token the model likes early, so some beams finish before the limit
        expected = ref.generate(prompt, num_beams=4, max_new_tokens=24, do_sample=False, eos_token_id=eos,
                                pad_token_id=eos, length_penalty=length_penalty, early_stopping=early_stopping)
        expected_ids = [t for t in expected[0, 6:].tolist()]
        while expected_ids and expected_ids[-1] == eos:
            expected_ids.pop()  # transformers pads finished beams with pad (= eos here)
        params = SamplingParams(max_new_tokens=24, temperature=0, num_beams=4, length_penalty=length_penalty,
                                early_stopping=early_stopping)
        assert beam_generate(ours, prompt[0].tolist(), params, {eos}) == expected_ids


def test_one_beam_is_greedy(pair):
    _, ours = pair
    prompt = [3, 1, 4, 1, 5]
    params = SamplingParams(max_new_tokens=12, temperature=0, num_beams=1)
    assert beam_generate(ours, prompt, params) == generate_ids(ours, [prompt], params)[0]


def test_hypotheses_are_sorted_by_normalised_score(pair):
    _, ours = pair
    hyps = beam_search(ours, [1, 2, 3], SamplingParams(max_new_tokens=10, temperature=0, num_beams=3), {5})
    assert len(hyps) == 3
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


def test_sampling_with_beams_is_rejected():
    with pytest.raises(ValueError, match="temperature=0 with num_beams"):
        SamplingParams(num_beams=4, temperature=0.7)
