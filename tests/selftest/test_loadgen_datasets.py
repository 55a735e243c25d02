"""Token-exact prompts: every dataset kind, both APIs, BOS accounted, salts and shared prefixes.

A small byte-level BPE tokenizer is trained here (well under a second) with the same shape as
the suite's tiny model: a BOS-adding post-processor and a chat template that writes BOS.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from pdperf.loadgen.datasets import DatasetError, build_prompts, build_workload_prompts, load_tokenizer
from pdperf.specs import Sweep, Workload

pytestmark = pytest.mark.selftest

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    d = tmp_path_factory.mktemp("tok")
    corpus = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(corpus)], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                                                         "chat_template": CHAT_TEMPLATE}))
    return d


@pytest.mark.parametrize("dataset,isl,osl", [("random", 128, 16), ("random", 30, 3), ("prefill_only", 300, 1),
                                             ("decode_heavy", 32, 512)])
@pytest.mark.parametrize("api", ["completions", "chat"])
def test_exact_input_length(tok_dir, dataset, isl, osl, api):
    prompts = build_prompts(dataset=dataset, isl=isl, osl=osl, count=20, tokenizer_path=tok_dir, api=api,
                            salt="a1b2c3")
    tok = load_tokenizer(str(tok_dir), api)
    assert [tok.count(p.text) for p in prompts] == [isl] * 20
    assert all(p.input_tokens == isl and p.output_tokens == osl for p in prompts)


@pytest.mark.parametrize("isl", [2, 3, 5])
def test_tiny_isl_drops_the_salt_but_stays_exact(tok_dir, isl):
    prompts = build_prompts(dataset="random", isl=isl, osl=1, count=5, tokenizer_path=tok_dir, salt="a1b2c3")
    tok = load_tokenizer(str(tok_dir), "completions")
    assert [tok.count(p.text) for p in prompts] == [isl] * 5


def test_isl_below_the_chat_template_is_refused(tok_dir):
    with pytest.raises(DatasetError, match="chat template and special tokens .* alone take"):
        build_prompts(dataset="random", isl=5, osl=1, count=1, tokenizer_path=tok_dir, api="chat")


def test_isl_of_bos_only_is_refused(tok_dir):
    with pytest.raises(DatasetError, match="ISL 1: .*empty prompt"):
        build_prompts(dataset="random", isl=1, osl=1, count=1, tokenizer_path=tok_dir)


def test_bos_is_part_of_the_count(tok_dir):
    tok = load_tokenizer(str(tok_dir), "completions")
    p = build_prompts(dataset="random", isl=50, osl=1, count=1, tokenizer_path=tok_dir, salt="s")[0]
    ids = tok.ids(p.text)
    assert ids[0] == tok.tok.token_to_id("<|begin_of_text|>")
    assert len(tok.content_ids(p.text)) == 49  # the text itself is one shorter: the server adds BOS


def test_chat_count_includes_the_template(tok_dir):
    tok = load_tokenizer(str(tok_dir), "chat")
    p = build_prompts(dataset="random", isl=60, osl=1, count=1, tokenizer_path=tok_dir, api="chat", salt="s")[0]
    assert tok.pre.startswith("<|begin_of_text|><|user|>") and tok.post == "\n<|assistant|>\n"
    assert len(tok.content_ids(p.text)) < 60 == tok.count(p.text)


def test_seeded_and_salted(tok_dir):
    kw = dict(dataset="random", isl=64, osl=4, count=10, tokenizer_path=tok_dir)
    a = build_prompts(**kw, salt="aaaa", seed=1)
    assert [p.text for p in a] == [p.text for p in build_prompts(**kw, salt="aaaa", seed=1)]
    b = build_prompts(**kw, salt="bbbb", seed=1)
    assert all(x.text != y.text for x, y in zip(a, b))
    assert all(p.text.startswith(f"aaaa-{i}:") for i, p in enumerate(a))
    # no two requests (and no two points) share their first KV block (16 tokens)
    tok = load_tokenizer(str(tok_dir), "completions")
    heads = {tuple(tok.ids(p.text)[:16]) for p in a + b}
    assert len(heads) == 20


def test_start_index_continues_the_sequence(tok_dir):
    kw = dict(dataset="random", isl=40, osl=4, tokenizer_path=tok_dir, salt="s")
    assert build_prompts(**kw, count=5)[3:] == build_prompts(**kw, count=2, start_index=3)


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_prefix_repetition_shares_exactly_the_prefix(tok_dir, api):
    prompts = build_prompts(dataset="prefix_repetition", isl=200, osl=8, count=12, tokenizer_path=tok_dir, api=api,
                            prefix_len=120, num_prefixes=3, salt="x9")
    tok = load_tokenizer(str(tok_dir), api)
    ids = [tok.ids(p.text) for p in prompts]
    assert all(len(i) == 200 for i in ids)
    assert [p.group for p in prompts] == [i % 3 for i in range(12)]
    for a, pa in zip(ids, prompts):
        for b, pb in zip(ids, prompts):
            if pa is pb:
                continue
            if pa.group == pb.group:
                assert a[:120] == b[:120]
                assert a[120:] != b[120:]
            else:
                assert a[:120] != b[:120]


def test_prefix_salt_changes_between_points(tok_dir):
    kw = dict(dataset="prefix_repetition", isl=100, osl=8, count=2, tokenizer_path=tok_dir, prefix_len=60)
    tok = load_tokenizer(str(tok_dir), "completions")
    a = tok.ids(build_prompts(**kw, salt="p1")[0].text)
    b = tok.ids(build_prompts(**kw, salt="p2")[0].text)
    assert a[:16] != b[:16]


def test_workload_wrapper(tok_dir):
    wl = Workload(name="w", dataset="prefix_repetition", isl=90, osl=5, prefix_len=40, num_prefixes=2,
                  sweep=Sweep(kind="concurrency", points=[1], requests_per_point=4))
    prompts = build_workload_prompts(wl, tok_dir, 4, salt="z")
    assert len(prompts) == 4 and {p.group for p in prompts} == {0, 1}


def test_errors_name_the_problem(tok_dir, tmp_path):
    with pytest.raises(DatasetError, match="no tokenizer.json"):
        build_prompts(dataset="random", isl=10, osl=1, count=1, tokenizer_path=tmp_path)
    with pytest.raises(DatasetError, match="unknown"):
        build_prompts(dataset="sharegpt", isl=10, osl=1, count=1, tokenizer_path=tok_dir)
    with pytest.raises(DatasetError, match="prefix_len"):
        build_prompts(dataset="prefix_repetition", isl=10, osl=1, count=1, tokenizer_path=tok_dir, prefix_len=10)
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    with pytest.raises(DatasetError, match="chat_template"):
        build_prompts(dataset="random", isl=10, osl=1, count=1, tokenizer_path=tmp_path, api="chat")
