"""Named model presets, kept as data: the style of each family (the fields its configs share) and the
shapes of the tiny test models and the real checkpoints lmforge knows. `Config.from_name` reads them."""

from __future__ import annotations

from typing import Any

LLAMA_STYLE = dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False)
GPT2_STYLE = dict(norm="layernorm", mlp="gelu", position="learned", bias=True, norm_eps=1e-5)
GEMMA3_STYLE = dict(
    norm="rmsnorm", norm_unit_offset=True, mlp="geglu", position="rope", qk_norm=True,
    sandwich_norm=True, embedding_scale=True, sliding_window_pattern=6, rope_local_theta=10000.0,
)
# Mixture of Experts: Mixtral renormalises its top-k weights; Qwen-MoE does not, adds a gated
# shared expert and biases on q/k/v (model/moe.py)
MIXTRAL_STYLE = dict(LLAMA_STYLE, tie_embeddings=False, rope_theta=1e6, norm_topk_prob=True)
QWEN_MOE_STYLE = dict(LLAMA_STYLE, tie_embeddings=False, rope_theta=1e6, norm_topk_prob=False, qkv_bias=True)

# Mamba blocks: RMSNorm, tied embeddings, no biases but the conv's (Hugging Face MambaConfig defaults)
MAMBA_STYLE = dict(LLAMA_STYLE, arch="mamba", d_state=16, d_conv=4, expand=2, block_size=1 << 20, norm_eps=1e-5)

# BERT (Devlin et al. 2019): post-norm blocks, exact GELU, learned positions, token types, tied MLM decoder
BERT_STYLE = dict(arch="encoder", norm="layernorm", mlp="gelu_erf", position="learned", bias=True, norm_eps=1e-12,
                  type_vocab_size=2, tie_embeddings=True)

# T5 (Raffel et al. 2020): RMSNorm without offset, bucketed relative position bias, no biases; v1.0 ReLU
T5_STYLE = dict(arch="encoder_decoder", norm="rmsnorm", norm_eps=1e-6, mlp="relu", position="relative", bias=False,
                tie_embeddings=True, relative_attention_num_buckets=32, relative_attention_max_distance=128)

_TINY = dict(vocab_size=256, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128, block_size=512)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(LLAMA_STYLE, vocab_size=256, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                       intermediate_size=128, block_size=256),
    "tiny-gpt2": dict(GPT2_STYLE, vocab_size=256, n_layer=2, n_embd=64, n_head=4,
                      intermediate_size=256, block_size=256),
    "tiny-gemma3": dict(GEMMA3_STYLE, vocab_size=256, n_layer=6, n_embd=64, n_head=4, n_kv_head=1,
                        head_dim=32, intermediate_size=128, block_size=256, sliding_window=8,
                        norm_eps=1e-6, rope_theta=1e6, query_pre_attn_scalar=32),
    # long context: each RoPE scaling kind stretches a 128-token model to 512 (factor 4), plus two other positions
    "tiny-llama-ntk": dict(LLAMA_STYLE, **_TINY, rope_scaling="ntk", rope_factor=4.0),
    "tiny-llama-dynamic": dict(LLAMA_STYLE, **_TINY, rope_scaling="dynamic", rope_factor=4.0,
                               rope_original_max_position=128),
    "tiny-llama-yarn": dict(LLAMA_STYLE, **_TINY, rope_scaling="yarn", rope_factor=4.0,
                            rope_original_max_position=128),
    "tiny-alibi": dict(LLAMA_STYLE, **_TINY, position="alibi"),  # BLOOM / MPT style positions
    "tiny-sinusoidal": dict(LLAMA_STYLE, **_TINY, position="sinusoidal"),  # the original Transformer's
    # HuggingFaceTB/SmolLM2-135M-Instruct
    "smollm2-135m": dict(LLAMA_STYLE, vocab_size=49152, n_layer=30, n_embd=576, n_head=9, n_kv_head=3,
                         intermediate_size=1536, block_size=8192, rope_theta=100000.0, norm_eps=1e-5),
    # a distillation student (training/distill.py): SmolLM2-135M's shape and vocabulary with 4 of its 30 layers
    "smollm2-student-4l": dict(LLAMA_STYLE, vocab_size=49152, n_layer=4, n_embd=576, n_head=9, n_kv_head=3,
                               intermediate_size=1536, block_size=8192, rope_theta=100000.0, norm_eps=1e-5),
    # pretraining from zero (training/pretrain.py): SmolLM2's tokenizer, 8 layers of 384, tied embeddings;
    # 31.5M parameters (18.9M of them the embedding), trainable in minutes on a CPU
    "pretrain-llama-30m": dict(LLAMA_STYLE, vocab_size=49152, n_layer=8, n_embd=384, n_head=6, n_kv_head=2,
                               intermediate_size=1024, block_size=1024, rope_theta=10000.0, norm_eps=1e-5),
    # google/gemma-3-270m
    "gemma3-270m": dict(GEMMA3_STYLE, vocab_size=262144, n_layer=18, n_embd=640, n_head=4, n_kv_head=1,
                        head_dim=256, intermediate_size=2048, block_size=32768, rope_theta=1e6,
                        norm_eps=1e-6, sliding_window=512, query_pre_attn_scalar=256),
    "tiny-mixtral": dict(MIXTRAL_STYLE, vocab_size=256, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                         intermediate_size=128, block_size=256, n_experts=4, n_experts_per_tok=2,
                         router_aux_loss_coef=0.01),  # Switch Transformer's alpha = 1e-2
    "tiny-qwen-moe": dict(QWEN_MOE_STYLE, vocab_size=256, n_layer=2, n_embd=64, n_head=4, n_kv_head=4,
                          intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=128,
                          block_size=256, n_experts=8, n_experts_per_tok=2, router_aux_loss_coef=0.01),
    # mistralai/Mixtral-8x7B-v0.1 (46.7B parameters, 12.9B active per token)
    "mixtral-8x7b": dict(MIXTRAL_STYLE, vocab_size=32000, n_layer=32, n_embd=4096, n_head=32, n_kv_head=8,
                         intermediate_size=14336, block_size=32768, norm_eps=1e-5, n_experts=8,
                         n_experts_per_tok=2, router_aux_loss_coef=0.02),
    # Qwen/Qwen1.5-MoE-A2.7B (14.3B parameters, 2.7B active per token)
    "qwen1.5-moe-a2.7b": dict(QWEN_MOE_STYLE, vocab_size=151936, n_layer=24, n_embd=2048, n_head=16,
                              n_kv_head=16, intermediate_size=5632, moe_intermediate_size=1408,
                              shared_expert_intermediate_size=5632, block_size=8192, norm_eps=1e-6,
                              n_experts=60, n_experts_per_tok=4, router_aux_loss_coef=0.001),
    # Mamba (Gu & Dao 2023): no position table, so block_size only bounds generation
    "tiny-mamba": dict(MAMBA_STYLE, vocab_size=256, n_layer=2, n_embd=64),
    # state-spaces/mamba-130m (its config.json in Hugging Face's MambaConfig layout: vocab padded to 50280)
    "mamba-130m": dict(MAMBA_STYLE, vocab_size=50280, n_layer=24, n_embd=768),
    # Jamba-style hybrid (Lieber et al. 2024): one attention block (with its MLP) every 4th layer, Mamba elsewhere
    "tiny-hybrid": dict(MAMBA_STYLE, vocab_size=256, n_layer=4, n_embd=64, n_head=4, n_kv_head=2,
                        intermediate_size=128, block_size=4096, attn_layer_period=4, attn_layer_offset=2),
    "tiny-t5": dict(T5_STYLE, vocab_size=256, n_layer=2, n_decoder_layer=2, n_embd=64, n_head=4, head_dim=16,
                    intermediate_size=128, block_size=512),
    "tiny-bert": dict(BERT_STYLE, vocab_size=256, n_layer=2, n_embd=64, n_head=4, intermediate_size=128, block_size=128),
    # google-bert/bert-base-uncased
    "bert-base-uncased": dict(BERT_STYLE, vocab_size=30522, n_layer=12, n_embd=768, n_head=12, intermediate_size=3072,
                              block_size=512),
    # sentence-transformers/all-MiniLM-L6-v2 (the RAG embedder; its checkpoint has no MLM head)
    "all-minilm-l6-v2": dict(BERT_STYLE, vocab_size=30522, n_layer=6, n_embd=384, n_head=12, intermediate_size=1536,
                             block_size=512, mlm_head=False),
}
