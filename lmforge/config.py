"""Model configuration: one flat dataclass, checked where it is built; the named presets are data in presets.py."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from lmforge.presets import (  # re-exported: loaders import the family styles from here
    BERT_STYLE, GEMMA3_STYLE, GPT2_STYLE, LLAMA_STYLE, MAMBA_STYLE, MIXTRAL_STYLE, PRESETS, QWEN_MOE_STYLE, T5_STYLE,
)

NormKind = Literal["rmsnorm", "layernorm"]
# gelu: tanh-approximated (GPT-2); gelu_erf: exact (BERT); relu: T5 v1.0 (encoder_decoder only);
# geglu: also T5 v1.1's gated-gelu
MLPKind = Literal["swiglu", "geglu", "gelu", "gelu_erf", "relu"]
PositionKind = Literal["rope", "learned", "alibi", "sinusoidal", "relative"]  # relative: T5 bucketed bias
RopeScaling = Literal["none", "linear", "llama3", "ntk", "dynamic", "yarn"]
AttnImpl = Literal["sdpa", "math", "flash"]
ArchKind = Literal["transformer", "mamba", "encoder", "encoder_decoder"]  # mamba: Mamba blocks, attention where
# `mixers` says (hybrid); encoder: BERT-style bidirectional post-norm encoder (model/encoder.py);
# encoder_decoder: T5 (model/encoder_decoder.py)
MixerKind = Literal["attention", "mamba"]
BUILTIN_KINDS = {"global", "sliding"}  # layer kinds that need no sparse pattern
# sparse pattern keys -> smallest value; the first five are the pattern's components (model/masks.py)
SPARSE_PATTERN_KEYS = {"window": 0, "stride": 0, "block": 0, "global_tokens": 0, "random_blocks": 0,
                       "dilation": 1, "random_block_size": 1, "seed": 0}


@dataclass
class Config:
    """Everything that decides a decoder-only transformer's shape and arithmetic.

    Layer choices are names (``Literal``) so a config round-trips through JSON; derived
    fields (``head_dim``, ``n_kv_head``, ``layer_types``) are filled in ``__post_init__``.
    """

    name: str = "custom"
    vocab_size: int = 32000
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_kv_head: int | None = None  # None -> n_head (multi-head); 1 -> multi-query
    head_dim: int | None = None  # None -> n_embd // n_head
    intermediate_size: int = 256
    block_size: int = 2048  # context length
    norm: NormKind = "rmsnorm"
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # Gemma: y = x_hat * (1 + w)
    mlp: MLPKind = "swiglu"
    position: PositionKind = "rope"
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # Gemma 3: sliding layers use their own base
    rope_scaling: RopeScaling = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 scaling
    rope_high_freq_factor: float = 4.0  # llama3 scaling
    rope_original_max_position: int = 8192  # llama3, dynamic and yarn scaling
    rope_beta_fast: float = 32.0  # yarn: rotations above which a frequency is kept
    rope_beta_slow: float = 1.0  # yarn: rotations below which a frequency is interpolated
    rope_attention_factor: float | None = None  # yarn: logit scale; None -> 0.1 ln(factor) + 1
    bias: bool = False  # biases on every linear (GPT-2)
    qk_norm: bool = False  # RMSNorm on per-head queries and keys (Gemma 3)
    sandwich_norm: bool = False  # extra norms after attention and MLP (Gemma 2/3)
    embedding_scale: bool = False  # multiply embeddings by sqrt(n_embd) (Gemma)
    tie_embeddings: bool = True
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5
    sliding_window: int | None = None
    sliding_window_pattern: int = 0  # every k-th layer is global, the rest slide; 0 -> none slide
    layer_types: list[str] = field(default_factory=list)  # "global" | "sliding", derived
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    attn_impl: AttnImpl = "sdpa"
    # Mixture of Experts (model/moe.py); n_experts == 0 is a dense MLP
    n_experts: int = 0
    n_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # None -> intermediate_size
    shared_expert_intermediate_size: int = 0  # Qwen-MoE: a gated shared expert; 0 -> none
    norm_topk_prob: bool = True  # Mixtral renormalises the top-k weights, Qwen-MoE does not
    router_aux_loss_coef: float = 0.0  # load-balancing loss coefficient in the training objective
    router_z_loss_coef: float = 0.0
    capacity_factor: float | None = None  # tokens per expert cap = factor * tokens * k / experts; None -> no drop
    moe_step: int = 1  # every moe_step-th layer is MoE, the others dense (Qwen-MoE decoder_sparse_step)
    dense_layers: list[int] = field(default_factory=list)  # layers kept dense (Qwen-MoE mlp_only_layers)
    qkv_bias: bool | None = None  # biases on q/k/v only (Qwen2); None -> `bias`
    # Sparse attention (model/sparse.py): layer kind -> pattern spec; layer_types names the kinds
    sparse_patterns: dict[str, dict[str, Any]] = field(default_factory=dict)
    # State spaces (model/ssm.py, model/mamba.py): Mamba's selective SSM, named as its config.json names them
    arch: ArchKind = "transformer"
    d_state: int = 16  # N, the SSM state per channel (state_size)
    d_conv: int = 4  # causal depthwise conv width (conv_kernel)
    expand: int = 2  # inner width = expand * n_embd (intermediate_size)
    dt_rank: int | None = None  # rank of the delta projection (time_step_rank); None -> ceil(n_embd / 16)
    conv_bias: bool = True  # use_conv_bias; `bias` is use_bias (in_proj, out_proj)
    attn_layer_period: int = 0  # hybrid (Jamba): layer i attends when i % period == offset; 0 -> all Mamba
    attn_layer_offset: int = 0
    mixers: list[str] = field(default_factory=list)  # per layer "attention" | "mamba", derived
    # Encoders (model/encoder.py): BERT's segment embeddings and masked-LM head, named as its config.json names them
    type_vocab_size: int = 2  # token type (segment) ids; 0 -> no token type embeddings
    mlm_head: bool = True  # the masked-LM head (cls.predictions); embedding-only checkpoints have none
    # Encoder-decoder (model/encoder_decoder.py): T5; n_layer is the encoder's depth, block_size the longest input
    n_decoder_layer: int | None = None  # None -> n_layer (num_decoder_layers)
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    decoder_start_token_id: int = 0  # T5 starts decoding from the pad token

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; set head_dim")
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head} (grouped-query attention)"
            )
        if not self.layer_types:
            self.layer_types = [self._layer_type(i) for i in range(self.n_layer)]
        if len(self.layer_types) != self.n_layer:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for n_layer={self.n_layer}")
        for name, allowed in (("norm", NormKind), ("mlp", MLPKind), ("position", PositionKind),
                              ("rope_scaling", RopeScaling), ("attn_impl", AttnImpl)):
            if getattr(self, name) not in allowed.__args__:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed.__args__}")
        if self.rope_scaling != "none" and self.rope_factor <= 0:
            raise ValueError(f"rope_factor={self.rope_factor} must be > 0 for rope_scaling={self.rope_scaling!r} "
                             "(the context stretch, e.g. 4.0 for 4x longer)")
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        self._check_moe()
        self._check_sparse()
        self._check_ssm()
        self._check_encoder()
        self._check_encoder_decoder()

    def _check_moe(self) -> None:
        """Mixture-of-Experts fields: derive the expert width, refuse what the router cannot do."""
        if self.n_experts < 0:
            raise ValueError(f"n_experts={self.n_experts} must be >= 0 (0 is a dense MLP)")
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if not self.n_experts:
            return
        if not 1 <= self.n_experts_per_tok <= self.n_experts:
            raise ValueError(f"n_experts_per_tok={self.n_experts_per_tok} must be between 1 and n_experts="
                             f"{self.n_experts}: top-k picks k distinct experts per token")
        if self.mlp != "swiglu":
            raise ValueError(f"mlp={self.mlp!r}: experts are SwiGLU (Mixtral, Qwen-MoE); set mlp='swiglu'")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0, or None for no token dropping")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "shared_expert_intermediate_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.moe_step < 1:
            raise ValueError(f"moe_step={self.moe_step} must be >= 1 (1: every layer is MoE)")
        outside = [i for i in self.dense_layers if not 0 <= i < self.n_layer]
        if outside:
            raise ValueError(f"dense_layers {outside} are not layers of a {self.n_layer}-layer model")

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i routes to experts (Qwen2-MoE's rule: every moe_step-th, not in dense_layers)."""
        return self.n_experts > 0 and (i + 1) % self.moe_step == 0 and i not in self.dense_layers

    def _check_sparse(self) -> None:
        """Sparse attention: every layer kind is known, every pattern well formed, inside the context and
        leaving each query a key (model/masks.py defines the rules)."""
        unknown = sorted(set(self.layer_types) - BUILTIN_KINDS - set(self.sparse_patterns))
        if unknown:
            raise ValueError(f"layer_types names kinds {unknown} that are neither {sorted(BUILTIN_KINDS)} nor keys of "
                             f"sparse_patterns {sorted(self.sparse_patterns)}; add their patterns or rename them")
        for kind, spec in self.sparse_patterns.items():
            _check_pattern(f"sparse_patterns[{kind!r}]", spec, self.block_size)
            if kind in BUILTIN_KINDS:
                raise ValueError(f"sparse_patterns[{kind!r}]: {kind!r} is a built-in layer kind; name the pattern otherwise")
            if kind not in self.layer_types:
                raise ValueError(f"sparse_patterns[{kind!r}] is used by no layer; name it in layer_types "
                                 "(lmforge.model.masks.layer_schedule builds them) or drop it")
        if self.sparse_patterns and self.position == "alibi":
            raise ValueError("sparse_patterns with position='alibi': the block-sparse kernel adds no ALiBi bias; "
                             "use position='rope' (or another) with sparse layers")

    def _check_ssm(self) -> None:
        """State-space fields: derive dt_rank and each layer's mixer; refuse what a Mamba or hybrid
        model cannot combine (model/mamba.py builds it)."""
        if self.arch not in ArchKind.__args__:
            raise ValueError(f"arch={self.arch!r} is not one of {ArchKind.__args__}")
        if self.dt_rank is None:
            self.dt_rank = -(-self.n_embd // 16)  # Mamba's "auto": ceil(d_model / 16)
        if self.arch == "mamba" and not 0 <= self.attn_layer_offset < max(1, self.attn_layer_period):
            raise ValueError(f"attn_layer_offset={self.attn_layer_offset} must be in [0, attn_layer_period="
                             f"{self.attn_layer_period}) (Jamba: period 8, offset 4)")
        if not self.mixers:
            self.mixers = [self._mixer(i) for i in range(self.n_layer)]
        if len(self.mixers) != self.n_layer or set(self.mixers) - set(MixerKind.__args__):
            raise ValueError(f"mixers={self.mixers} must name {self.n_layer} layers, each one of {MixerKind.__args__}")
        if self.arch != "mamba":
            if "mamba" in self.mixers:
                raise ValueError(f"mixers names Mamba layers but arch={self.arch!r}; set arch='mamba' for SSM and "
                                 "hybrid models")
            return
        for name in ("d_state", "d_conv", "expand", "dt_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1 for arch='mamba'")
        unsupported = {"n_experts": self.n_experts, "sparse_patterns": self.sparse_patterns,
                       "sliding_window": self.sliding_window}
        for name, value in unsupported.items():
            if value:
                raise ValueError(f"{name}={value!r} with arch='mamba': Mamba and hybrid models have dense MLPs and "
                                 f"full attention only; drop {name}")
        if "attention" in self.mixers and self.position != "rope":
            raise ValueError(f"position={self.position!r}: the attention layers of a hybrid use RoPE; "
                             "set position='rope'")

    def _mixer(self, i: int) -> str:
        """Layer i's sequence mixer: attention in a transformer, Mamba with attention every period-th layer."""
        if self.arch != "mamba":
            return "attention"
        period = self.attn_layer_period
        return "attention" if period and i % period == self.attn_layer_offset else "mamba"

    @property
    def d_inner(self) -> int:
        """The Mamba mixer's inner width (Hugging Face's intermediate_size of MambaConfig)."""
        return self.expand * self.n_embd

    def _check_encoder(self) -> None:
        """Encoder fields: what a BERT-style encoder (model/encoder.py) is built from, refused elsewhere."""
        if self.type_vocab_size < 0:
            raise ValueError(f"type_vocab_size={self.type_vocab_size} must be >= 0 (0: no token type embeddings)")
        if self.arch != "encoder":
            return
        required = {"position": "learned", "norm": "layernorm", "bias": True, "n_kv_head": self.n_head,
                    "head_dim": self.n_embd // self.n_head}
        for name, value in required.items():
            if getattr(self, name) != value:
                raise ValueError(f"{name}={getattr(self, name)!r} with arch='encoder': a BERT-style encoder has "
                                 f"learned positions, LayerNorm, biases and n_embd split over its heads; set {name}={value!r}")
        if self.mlp not in ("gelu_erf", "gelu"):
            raise ValueError(f"mlp={self.mlp!r} with arch='encoder': its MLP is dense -> GELU -> dense; "
                             "set mlp='gelu_erf' (BERT) or 'gelu' (tanh-approximated)")
        self._refuse_decoder_extras("the encoder has full bidirectional attention and a dense MLP only")

    def _check_encoder_decoder(self) -> None:
        """T5 fields: derive the decoder depth; refuse T5-only choices elsewhere and what T5 lacks."""
        if self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        if self.arch != "encoder_decoder":
            for name, value in (("mlp", "relu"), ("position", "relative")):
                if getattr(self, name) == value:
                    raise ValueError(f"{name}={value!r} is T5's; only arch='encoder_decoder' builds it")
            return
        required = {"position": "relative", "norm": "rmsnorm", "bias": False, "norm_unit_offset": False,
                    "n_kv_head": self.n_head}
        for name, value in required.items():
            if getattr(self, name) != value:
                raise ValueError(f"{name}={getattr(self, name)!r} with arch='encoder_decoder': T5 has relative "
                                 "position buckets, RMSNorm without offset, no biases and multi-head attention; "
                                 f"set {name}={value!r}")
        if self.mlp not in ("relu", "geglu"):
            raise ValueError(f"mlp={self.mlp!r} with arch='encoder_decoder': T5's feed-forward is 'relu' (v1.0) or "
                             "'geglu' (v1.1 gated-gelu)")
        for name in ("n_decoder_layer", "relative_attention_num_buckets", "relative_attention_max_distance"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1 for arch='encoder_decoder'")
        if self.relative_attention_num_buckets < 4:
            raise ValueError(f"relative_attention_num_buckets={self.relative_attention_num_buckets} must be >= 4: "
                             "half are exact offsets, half log-spaced, in each direction")
        self._refuse_decoder_extras("T5 has full attention and a dense feed-forward only")

    def _refuse_decoder_extras(self, why: str) -> None:
        """Encoders and T5 build none of the decoder's extras (MoE, sparse or sliding attention, Gemma's norms
        and softcaps): name the first one set."""
        extras = {"n_experts": self.n_experts, "sparse_patterns": self.sparse_patterns,
                  "sliding_window": self.sliding_window, "qk_norm": self.qk_norm,
                  "sandwich_norm": self.sandwich_norm, "embedding_scale": self.embedding_scale,
                  "attn_logit_softcap": self.attn_logit_softcap, "final_logit_softcap": self.final_logit_softcap}
        for name, value in extras.items():
            if value:
                raise ValueError(f"{name}={value!r} with arch={self.arch!r}: {why}; drop {name}")

    def _layer_type(self, i: int) -> str:
        if self.sliding_window and self.sliding_window_pattern:
            return "global" if (i + 1) % self.sliding_window_pattern == 0 else "sliding"
        return "sliding" if self.sliding_window else "global"

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)



def _check_pattern(where: str, spec: dict[str, Any], block_size: int) -> None:
    """One sparse pattern spec: known integer keys, spans inside the context, at least one component."""
    unknown = sorted(set(spec) - set(SPARSE_PATTERN_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; the keys are {sorted(SPARSE_PATTERN_KEYS)}")
    for key, value in spec.items():
        if type(value) is not int or value < SPARSE_PATTERN_KEYS[key]:
            raise ValueError(f"{where}[{key!r}]={value!r} must be an int >= {SPARSE_PATTERN_KEYS[key]}")
    if "dilation" in spec and not spec.get("window"):
        raise ValueError(f"{where} sets dilation without window; dilation spaces the window's keys, so set window")
    if ("random_block_size" in spec or "seed" in spec) and not spec.get("random_blocks"):
        raise ValueError(f"{where} sets random_block_size or seed without random_blocks; set random_blocks >= 1")
    spans = {"window": spec.get("window", 0) * spec.get("dilation", 1), "stride": spec.get("stride", 0),
             "block": spec.get("block", 0), "global_tokens": spec.get("global_tokens", 0),
             "random_block_size": spec.get("random_block_size", 0)}
    for key, span in spans.items():
        if span > block_size:
            raise ValueError(f"{where}[{key!r}] spans {span} positions, more than the context block_size="
                             f"{block_size}; make it at most {block_size}, or use full attention ('global') there")
    components = list(SPARSE_PATTERN_KEYS)[:5]
    if not any(spec.get(key) for key in components):
        # each component, once on, shows every query its own position or token 0, so none is left without a key
        raise ValueError(f"{where}={spec} leaves every query with no key; set at least one of {components} >= 1")

