"""Greedy decoding and beam search for encoder-decoder models (T5): the encoder runs once, its cross-attention
keys/values (the encoder output cache) serve every step, and the decoder's self-attention keys/values
are cached so each step feeds one token per row."""

from __future__ import annotations

import torch

from lmforge.generation.beam import Hypothesis, search_beams
from lmforge.generation.sampling import SamplingParams
from lmforge.model.encoder_decoder import EncoderDecoder


@torch.no_grad()
def greedy_seq2seq(model: EncoderDecoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   max_new_tokens: int = 20, eos_id: int | None = 1, pad_id: int = 0) -> torch.Tensor:
    """Decoder ids (B, 1 + n) by argmax, starting from config.decoder_start_token_id, as transformers'
    generate(do_sample=False): a row that emitted eos_id is padded with pad_id until all rows end.

    Args:
        input_ids: (B, S) encoder input; attention_mask: (B, S) 1 at real tokens, 0 at padding.
        max_new_tokens: at most this many tokens after the start token (>= 1).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    B = input_ids.shape[0]
    model.check_length(1 + max_new_tokens, "decoder")  # refuse before encoding, not mid-way
    cross = model.cross_kv(model.encode(input_ids, attention_mask))  # the encoder output cache
    out = torch.full((B, 1), model.config.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    cache: list = []  # per decoder layer (k, v), (B, n_head, t, head_dim)
    for _ in range(max_new_tokens):
        logits = model.decode(out[:, -1:], cross, attention_mask, cache=cache)  # (B, 1, V)
        token = logits[:, -1].argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        out = torch.cat([out, token[:, None]], 1)
        if eos_id is not None:
            done |= token == eos_id
            if bool(done.all()):
                break
    return out


@torch.no_grad()
def beam_search_seq2seq(model: EncoderDecoder, input_ids: torch.Tensor, params: SamplingParams,
                        eos_ids: set[int], attention_mask: torch.Tensor | None = None) -> list[Hypothesis]:
    """The best decoder hypotheses for one input (1, S), best first, by the rules of
    generation/beam.py (Hugging Face's): the encoder runs once and its keys/values are shared by
    every beam; each beam's decoder self-attention cache follows it when beams are reordered.

    Hypothesis tokens exclude the decoder start token and include the eos that ended them.
    """
    if input_ids.shape[0] != 1:
        raise ValueError(f"beam_search_seq2seq takes one input (1, S); got a batch of {input_ids.shape[0]}")
    k, max_new = params.num_beams, params.max_new_tokens
    model.check_length(1 + max_new, "decoder")
    cross = [(ck.expand(k, -1, -1, -1), cv.expand(k, -1, -1, -1))  # (k, n_head, S, hd), one encoder pass
             for ck, cv in model.cross_kv(model.encode(input_ids, attention_mask))]
    mask = None if attention_mask is None else attention_mask.expand(k, -1)
    start = torch.full((k, 1), model.config.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    cache: list = []
    logits = model.decode(start, cross, mask, cache=cache)[:, -1]  # (k, V)

    def advance(parents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        cache[:] = [(ck[parents], cv[parents]) for ck, cv in cache]  # each beam keeps its parent's keys
        return model.decode(tokens[:, None], cross, mask, cache=cache)[:, -1]

    return search_beams(logits, advance, params, eos_ids, max_new)
