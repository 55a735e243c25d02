"""The local model builder: tiny-llama with real weights, GPU shapes without, user folders checked.

Builds go into a temporary cache, never the repo's ``.models/``. The tiny model takes a few
seconds to build (tokenizer training plus random weights), so it is built once per module.
"""

from __future__ import annotations

import json

import pytest

from pdperf import models
from pdperf.errors import ModelError
from pdperf.models import MODELS, check_model_folder, ensure_model, has_weights, model_path, tokenizer_covers_vocab

pytestmark = pytest.mark.selftest


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def tiny(cache):
    return ensure_model("tiny-llama", cache=cache)


def test_tiny_llama_is_a_complete_checkpoint(tiny, cache):
    assert tiny.parent == cache and tiny.name.startswith("tiny-llama-")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", ".complete"):
        assert (tiny / name).is_file(), f"{name} missing from {sorted(p.name for p in tiny.iterdir())}"
    assert list(tiny.glob("*.safetensors")) and has_weights(tiny)
    config = json.loads((tiny / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert config[key] == MODELS["tiny-llama"]["config"][key]
    assert not list(cache.glob(".tiny-llama-*")), "a temporary build folder was left behind"


def test_tiny_llama_tokenizer_round_trips(tiny):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    config = json.loads((tiny / "config.json").read_text())
    assert tok.get_vocab_size() <= config["vocab_size"]
    enc = tok.encode("def fibonacci(n):\n    return n")
    assert enc.ids[0] == tok.token_to_id("<|begin_of_text|>") == config["bos_token_id"]
    assert tok.decode(enc.ids, skip_special_tokens=True) == "def fibonacci(n):\n    return n"


def test_second_call_reuses_the_build(tiny, cache, monkeypatch):
    mtime = (tiny / ".complete").stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("ensure_model rebuilt a complete model")

    monkeypatch.setattr(models, "_write_tokenizer", no_rebuild)
    monkeypatch.setattr(models, "_write_weights", no_rebuild)
    assert ensure_model("tiny-llama", cache=cache) == tiny
    assert (tiny / ".complete").stat().st_mtime_ns == mtime
    assert model_path("tiny-llama", cache) == tiny


def test_gpu_shape_has_config_and_tokenizer_but_no_weights(cache):
    path = ensure_model("llama-3.1-8b", cache=cache)
    assert (path / "tokenizer.json").is_file()
    assert not has_weights(path), "GPU shapes are served with load_format: dummy; no weights expected"
    config = json.loads((path / "config.json").read_text())
    assert config == MODELS["llama-3.1-8b"]["config"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (4096, 32, 32, 8, 128256)


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(dest, *args):
        raise RuntimeError("tokenizer training failed")

    monkeypatch.setattr(models, "_write_tokenizer", broken)
    with pytest.raises(RuntimeError, match="tokenizer training failed"):
        ensure_model("llama-3.1-8b", cache=tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_build_folder_changes_with_the_spec(cache, monkeypatch):
    tiny = model_path("tiny-llama", cache)
    assert tiny == model_path("tiny-llama", cache)
    spec = MODELS["tiny-llama"]
    monkeypatch.setitem(MODELS, "tiny-llama", {**spec, "config": {**spec["config"], "num_hidden_layers": 2}})
    changed = model_path("tiny-llama", cache)
    assert changed != tiny and changed.name.startswith("tiny-llama-")


def test_missing_user_folder_names_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError) as e:
        ensure_model(str(missing))
    msg = str(e.value)
    assert str(missing) in msg and "does not exist" in msg
    assert "python -m pdperf.models tiny-llama" in msg


def test_user_folder_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError) as e:
        ensure_model(str(tmp_path))
    assert str(tmp_path) in str(e.value) and "missing tokenizer.json" in str(e.value)


def test_complete_user_folder_is_accepted_as_is(tmp_path):
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_text("{}")
    assert ensure_model(str(tmp_path)) == tmp_path
    assert check_model_folder(tmp_path) == tmp_path
    assert not has_weights(tmp_path)


def test_unknown_model_key_lists_the_known_ones(cache):
    with pytest.raises(ModelError) as e:
        model_path("llama-9000", cache)
    assert "tiny-llama" in str(e.value) and "llama-3.1-8b" in str(e.value)


def test_gpu_shapes_tokenizer_has_text_for_every_id(tiny, cache):
    """An id without text costs vLLM's detokenizer ~100x a normal one (pdperf/models.py): the GPU
    shapes' tokenizer is padded to the model's vocabulary, and prompts still encode as before."""
    from tokenizers import Tokenizer

    from pdperf.models import tokenizer_covers_vocab

    assert tokenizer_covers_vocab(tiny)
    big = ensure_model("llama-3.1-8b", cache)
    assert tokenizer_covers_vocab(big)
    tok, small = Tokenizer.from_file(str(big / "tokenizer.json")), Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert tok.get_vocab_size() == 128256
    assert tok.decode([127000, 128255]).strip() and tok.decode([100000]).startswith(" zq")
    text = "def main(argv: list[str]) -> int:\n    return 0  # a line of Python"
    assert tok.encode(text).ids == small.encode(text).ids
    assert tokenizer_covers_vocab(None) and tokenizer_covers_vocab(cache / "missing")


def test_tokenizer_covers_vocab_sees_a_short_tokenizer(tiny, tmp_path):
    cfg = json.loads((tiny / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 128256}))
    (tmp_path / "tokenizer.json").write_text((tiny / "tokenizer.json").read_text())
    assert not tokenizer_covers_vocab(tmp_path)
