"""Facts about a model that the planner needs and no measurement gives: KV bytes and weights.

Why separate: these numbers come from the model's published shape, not from a fit, and the
planner must say where each came from. KV bytes per token follow from ``config.json``
(``pdperf.models.MODELS``): every layer keeps K and V for every KV head in bf16, which is what
NIXL moves and what vLLM allocates when a KV connector is on (the hybrid allocator that would
keep only a window for sliding-window layers is off then). Weight sizes are the checkpoints'
sizes on disk, rounded up; they decide how much GPU memory is left for KV at a given TP.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdperf.errors import PdperfError

#: Checkpoint sizes (GB), as served: GPT-OSS-120B's MoE experts in MXFP4, the rest bf16.
WEIGHTS_GB = {"gpt-oss-120b": 65.0, "llama-3.1-8b": 16.1, "llama-3.1-70b": 141.0, "tiny-llama": 0.01}


@dataclass(frozen=True)
class ModelFacts:
    """What one model needs in memory: weights, and KV per token of context (all layers, K and V, bf16)."""

    model: str
    weights_gb: float
    kv_bytes_per_token: float
    source: str


def model_facts(model: str, *, weights_gb: float | None = None, kv_bytes_per_token: float | None = None) -> ModelFacts:
    """The facts of ``model`` (a ``pdperf.models.MODELS`` key); explicit values override them."""
    from pdperf.models import MODELS

    spec = MODELS.get(model)
    if spec is None and (weights_gb is None or kv_bytes_per_token is None):
        raise PdperfError(f"model '{model}': its weight size and KV bytes per token are unknown (known: "
                          f"{', '.join(sorted(MODELS))}); pass --weights-gb and --kv-bytes-per-token")
    source = []
    if kv_bytes_per_token is None:
        cfg = spec["config"]  # type: ignore[index]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        kv_bytes_per_token = float(cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2 * 2)
        source.append("KV bytes from config.json (all layers, K+V, bf16)")
    else:
        source.append("KV bytes given")
    if weights_gb is None:
        if model not in WEIGHTS_GB:
            raise PdperfError(f"model '{model}': weight size unknown; pass --weights-gb")
        weights_gb = WEIGHTS_GB[model]
        source.append("weights from the checkpoint size")
    else:
        source.append("weights given")
    return ModelFacts(model=model, weights_gb=float(weights_gb), kv_bytes_per_token=float(kv_bytes_per_token),
                      source="; ".join(source))
