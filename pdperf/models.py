"""Models without a hub: built locally, deterministically, cached by their inputs.

No model hub is reachable from the machines this suite runs on in CI, and GPU performance
depends on a model's shapes, not its weight values. So:

- ``tiny-llama`` (CPU): a 4-layer random-weight Llama (hidden 256) with a byte-level BPE
  tokenizer trained on Python's own standard library sources. Built in seconds; real
  weights on disk (safetensors), so vLLM loads it like any checkpoint.
- GPU shapes (``llama-3.1-8b``, ``llama-3.1-70b``, ``gpt-oss-120b``): ``config.json`` in the
  real shapes plus the same locally trained tokenizer, no weights; serve them with
  ``load_format: dummy`` (vLLM fills random weights).

A tokenizer must have text for every id the model can emit, as a real model's does. The
trained vocabulary has 8192 tokens; a GPU shape's model emits ids up to 128256 or 201088. An id
without text sends vLLM's incremental detokenizer (tokenizers' ``DecodeStream``) down a path
that re-decodes the pending ids on every step: ~170 us a token against ~2 us (measured on this
CPU, ``benchmarks/side_by_side.py --detokenizer-cost``), all of it in the one API-server process.
With greedy sampling on dummy weights nearly every id is such an id, and at a few thousand
tokens a second that process saturates and slows the server it should only describe. So the
vocabulary is padded to the model's ``vocab_size`` with filler tokens: plain-text words that
merges never produce (prompts encode as before) but that decode like any other token.

A model folder lives at ``.models/<name>-<hash>/`` where the hash covers every input of the
build (builder version, config, tokenizer corpus recipe); a changed input builds a new
folder, an unchanged one is reused. Builds are atomic (temp folder + rename) and guarded
by a file lock, so concurrent pytest-xdist workers build once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

from pdperf.errors import ModelError

BUILDER_VERSION = 3
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".models"
CACHE_ENV = "PDPERF_MODEL_CACHE"  # another cache folder (a shared disk, a read-only tree's writable copy)


def cache_dir(environ: Mapping[str, str]) -> Path:
    """The model cache a process uses: ``PDPERF_MODEL_CACHE`` in ``environ`` (the caller's environment,
    read where the process starts: the session's options, a CLI), else ``.models/`` in the repo."""
    return Path(environ[CACHE_ENV]) if environ.get(CACHE_ENV) else DEFAULT_CACHE

# Tokenizer: byte-level BPE trained on a fixed, sorted list of stdlib files. Python's stdlib
# is on every machine that runs this suite; the file list is part of the hash.
TOKENIZER_VOCAB = 8192
_CORPUS_FILES = ("argparse.py", "asyncio/base_events.py", "collections/__init__.py", "dataclasses.py",
                 "datetime.py" if (Path(sysconfig.get_paths()["stdlib"]) / "datetime.py").exists() else "enum.py",
                 "email/message.py", "functools.py", "http/client.py", "inspect.py", "json/decoder.py",
                 "logging/__init__.py", "pathlib.py" if (Path(sysconfig.get_paths()["stdlib"]) / "pathlib.py").exists()
                 else "pathlib/__init__.py", "subprocess.py", "textwrap.py", "typing.py", "unittest/case.py")
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_LLAMA_BASE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "attention_bias": False, "mlp_bias": False, "rms_norm_eps": 1e-5, "initializer_range": 0.02,
    "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "tie_word_embeddings": False,
    "use_cache": True,
}

MODELS: dict[str, dict[str, Any]] = {
    "tiny-llama": {
        "weights": True,
        "config": {**_LLAMA_BASE, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                   "vocab_size": TOKENIZER_VOCAB, "max_position_embeddings": 8192, "rope_theta": 10000.0,
                   "torch_dtype": "float32"},
    },
    "llama-3.1-8b": {
        "weights": False,
        "config": {**_LLAMA_BASE, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                   "max_position_embeddings": 131072, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
                   "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    },
    "llama-3.1-70b": {
        "weights": False,
        "config": {**_LLAMA_BASE, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                   "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                   "max_position_embeddings": 131072, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
                   "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    },
    # openai/gpt-oss-120b's published config.json (MoE, 128 experts, top-4, MXFP4 experts).
    "gpt-oss-120b": {
        "weights": False,
        "config": {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880,
                   "intermediate_size": 2880, "num_hidden_layers": 36, "num_attention_heads": 64,
                   "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 128,
                   "num_experts_per_tok": 4, "experts_per_token": 4, "vocab_size": 201088,
                   "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 150000,
                   "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                    "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                    "truncate": False},
                   "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"] * 18,
                   "attention_bias": True, "swiglu_limit": 7.0, "hidden_act": "silu",
                   "initial_context_length": 4096, "router_aux_loss_coef": 0.9, "output_router_logits": False,
                   "tie_word_embeddings": False, "use_cache": True, "torch_dtype": "bfloat16",
                   "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
                   "quantization_config": {"quant_method": "mxfp4",
                                           "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                      "model.layers.*.mlp.router",
                                                                      "model.embed_tokens", "lm_head"]}},
    },
}


def _corpus_paths() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = [stdlib / f for f in _CORPUS_FILES]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ModelError(f"tokenizer corpus: standard-library files missing: {missing}")
    return paths


def _padded_vocab(config: dict[str, Any]) -> int | None:
    """The vocabulary size the tokenizer is padded to, or None when the trained one covers the model."""
    vocab = config.get("vocab_size")
    return vocab if isinstance(vocab, int) and vocab > TOKENIZER_VOCAB else None


def _build_hash(name: str) -> str:
    spec = MODELS[name]
    h = hashlib.sha256()
    recipe: dict[str, Any] = {"builder": BUILDER_VERSION, "spec": spec, "vocab": TOKENIZER_VOCAB,
                              "corpus": list(_CORPUS_FILES), "special": SPECIAL_TOKENS, "chat": CHAT_TEMPLATE}
    pad = _padded_vocab(spec["config"])
    if pad is not None:  # only then: the tiny model's folder (and the CPU baselines' model) stays the same
        recipe["tokenizer_padded_to"] = pad
    h.update(json.dumps(recipe, sort_keys=True).encode())
    for p in _corpus_paths():
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:12]


def _filler_tokens(existing: dict[str, int], count: int) -> list[str]:
    """``count`` byte-level token strings that are not in ``existing``: "Ġ" (a space) + letters.

    Each decodes to a space and ASCII letters, so every padded id has text. No merge builds
    them, so encoding a prompt never produces one.
    """
    letters = "abcdefghijklmnopqrstuvwxyz"
    out: list[str] = []
    n = 0
    while len(out) < count:
        k, word = n, ""
        while True:
            k, r = divmod(k, 26)
            word += letters[r]
            if k == 0:
                break
        n += 1
        tok = "\u0120" + "zq" + word  # "zq..." keeps fillers apart from trained words
        if tok not in existing:
            out.append(tok)
    return out


def pad_tokenizer_json(data: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """A tokenizer.json whose BPE vocabulary is padded with filler tokens to ``vocab_size`` ids."""
    vocab: dict[str, int] = data["model"]["vocab"]
    used = set(vocab.values()) | {int(t["id"]) for t in data.get("added_tokens") or []}
    free = [i for i in range(vocab_size) if i not in used]
    for tok, tid in zip(_filler_tokens(vocab, len(free)), free):
        vocab[tok] = tid
    return data


def _write_tokenizer(dest: Path, pad_to: int | None = None) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(p) for p in _corpus_paths()], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    tok.save(str(dest / "tokenizer.json"))
    if pad_to is not None:
        path = dest / "tokenizer.json"
        path.write_text(json.dumps(pad_tokenizer_json(json.loads(path.read_text()), pad_to)))
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>", "add_bos_token": True,
        "model_max_length": 131072, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
    }, indent=1))
    (dest / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>"}, indent=1))


def _write_weights(dest: Path, config: dict[str, Any]) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    model = LlamaForCausalLM(cfg).to(torch.float32)  # type: ignore[arg-type]  # transformers' stubs
    # Sharpen the output layer so greedy argmax is far from ties: PD-vs-collocated equality
    # checks then test the KV handoff, not float rounding between two batch shapes.
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    model.save_pretrained(str(dest), safe_serialization=True)
    (dest / "generation_config.json").unlink(missing_ok=True)


def model_path(name: str, cache: Path = DEFAULT_CACHE) -> Path:
    if name not in MODELS:
        raise ModelError(f"model '{name}': unknown; known models are {sorted(MODELS)}, or give a path to a folder "
                         "with config.json and tokenizer.json")
    return Path(cache) / f"{name}-{_build_hash(name)}"


def ensure_model(name_or_path: str, cache: Path = DEFAULT_CACHE) -> Path:
    """Return a ready model folder: a built one (building it if needed) or a user's path, checked."""
    if name_or_path not in MODELS:
        p = Path(name_or_path).expanduser()
        return check_model_folder(p)
    dest = model_path(name_or_path, cache)
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock", timeout=600):
        if (dest / ".complete").exists():
            return dest
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        try:
            spec = MODELS[name_or_path]
            config = dict(spec["config"])
            (tmp / "config.json").write_text(json.dumps(config, indent=1))
            _write_tokenizer(tmp, _padded_vocab(config))
            if spec["weights"]:
                _write_weights(tmp, config)
                (tmp / "config.json").write_text(json.dumps(config, indent=1))
            (tmp / ".complete").write_text(json.dumps({"name": name_or_path, "builder": BUILDER_VERSION}))
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


def check_model_folder(p: Path) -> Path:
    if not p.is_dir():
        raise ModelError(f"model folder {p}: does not exist; build one with `python -m pdperf.models tiny-llama` "
                         f"or set the topology's 'model' to one of {sorted(MODELS)}")
    missing = [f for f in ("config.json", "tokenizer.json") if not (p / f).exists()]
    if missing:
        raise ModelError(f"model folder {p}: missing {', '.join(missing)}; it needs a config.json and a "
                         "tokenizer.json (weights are optional with load_format: dummy)")
    return p


def tokenizer_covers_vocab(path: Path | str | None) -> bool:
    """Whether every token id the model can emit has text in its tokenizer (a user's folder may pair a
    model with a smaller tokenizer; the built ones are padded). True when unknown."""
    if path is None:
        return True
    try:
        vocab = json.loads((Path(path) / "config.json").read_text()).get("vocab_size")
        tok = json.loads((Path(path) / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return True
    known = {int(i) for i in (tok.get("model") or {}).get("vocab", {}).values()}
    known |= {int(t["id"]) for t in tok.get("added_tokens") or [] if "id" in t}
    return not isinstance(vocab, int) or len(known) >= vocab


def has_weights(path: Path) -> bool:
    return any(Path(path).glob("*.safetensors")) or any(Path(path).glob("*.bin"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdperf.models", description="Build a model folder and print its path.")
    ap.add_argument("name", choices=sorted(MODELS))
    ap.add_argument("--cache", type=Path, default=cache_dir(os.environ), help=f"default: ${CACHE_ENV} or .models/")
    args = ap.parse_args(argv)
    try:
        print(ensure_model(args.name, args.cache))
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
