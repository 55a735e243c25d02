"""Prompts with token-exact input lengths, seeded, with prefix-cache effects under control.

Why: ISL is a coordinate of every result (``isl5000-osl250``); a prompt that is 5 % longer
than its label makes every TTFT in that file wrong. So each prompt is fitted until the
*served model's* tokenizer, counted the way the server counts (``prompt_tokens``), gives the
requested ISL exactly:

- completions API: ``len(tokenizer.encode(text))`` *with* special tokens, because the
  tokenizer's post-processor adds BOS and vLLM encodes prompts with ``add_special_tokens``;
- chat API: the chat template (``tokenizer_config.json``) rendered around the text, then
  encoded *without* special tokens (the template writes BOS itself), as vLLM does.

Prefix caching can make a benchmark measure the cache instead of the engine. Every prompt
starts with a salt (a per-point nonce plus the request index), so no two requests and no two
load points share a first KV block, unless the dataset means to share
(``prefix_repetition``: a group prefix salted per point, a unique suffix). The runner can
also reset the server's prefix cache between points.

Kinds (``pdperf.specs.Workload.dataset``): ``random`` (random tokens decoded to text,
re-encoded and trimmed until exact), ``prefix_repetition`` (``num_prefixes`` groups sharing
``prefix_len`` tokens, as the reference study), ``prefill_only`` (random, OSL 1),
``decode_heavy`` (random, short input and long output; the workload sets the lengths).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from pdperf.errors import PdperfError

Api = Literal["completions", "chat"]
_FIT_ATTEMPTS = 12
_REDRAWS = 8
_SENTINEL = "\x00PDPERF_CONTENT\x00"


class DatasetError(PdperfError):
    """A prompt set that cannot be built as asked (tokenizer missing, ISL too small, ...)."""


@dataclass(frozen=True)
class Prompt:
    text: str
    input_tokens: int  # what the server's usage.prompt_tokens should say
    output_tokens: int  # max_tokens (ignore_eos makes it exact)
    group: int | None = None  # prefix group (prefix_repetition), else None


class PromptTokenizer:
    """The served model's tokenizer, counting prompt tokens the way the server will.

    ``count(text)`` is the server's ``prompt_tokens`` for a request whose prompt (or single
    user message, for chat) is ``text``.
    """

    def __init__(self, folder: Path, api: Api = "completions") -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        tok_file = folder / "tokenizer.json"
        if not tok_file.exists():
            raise DatasetError(f"tokenizer {folder}: no tokenizer.json there; pass the served model's folder "
                               "(for a built model: `python -m pdperf.models <name>` prints it)")
        self.folder = folder
        self.api = api
        self.tok = Tokenizer.from_file(str(tok_file))
        self.pre, self.post, self.add_special = "", "", True
        if api == "chat":
            self.pre, self.post = _chat_frame(folder)
            self.add_special = False
        self._clean: np.ndarray | None = None
        self._words: list[str] | None = None

    def ids(self, text: str) -> list[int]:
        """Token ids of the full prompt as the server sees it (frame and special tokens included)."""
        return self.tok.encode(self.pre + text + self.post, add_special_tokens=self.add_special).ids

    def count(self, text: str) -> int:
        return len(self.ids(text))

    def prefix_ids(self, text: str) -> list[int]:
        """Ids of everything up to the end of ``text`` (the frame's head included, its tail not)."""
        return self.tok.encode(self.pre + text, add_special_tokens=self.add_special).ids

    def content_ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def clean_ids(self) -> np.ndarray:
        """Token ids safe to draw at random: printable ASCII, not special, no markup characters.

        ``<``, ``>`` and ``|`` are left out so random text can never spell a special token such
        as ``<|begin_of_text|>``; tokens ending in whitespace are left out so a prefix never
        ends in whitespace that a following suffix could merge with.
        """
        if self._clean is None:
            special = set(self.tok.get_added_tokens_decoder())
            keep = []
            for tid in range(self.tok.get_vocab_size()):
                if tid in special:
                    continue
                s = self.tok.decode([tid])
                if (s and s.isascii() and s.isprintable() and not s[-1].isspace()
                        and not any(c in s for c in "<>|")):
                    keep.append(tid)
            if len(keep) < 100:
                raise DatasetError(f"tokenizer {self.folder}: only {len(keep)} tokens decode to plain printable "
                                   "text; random prompts need a byte-level or sentencepiece vocabulary")
            self._clean = np.asarray(keep, dtype=np.int64)
        return self._clean

    @property
    def words(self) -> list[str]:
        """Strings `` word`` (a space and ASCII letters) that encode to exactly one token alone.

        Pre-tokenizers split text before every such word, so a run of them costs exactly one
        token each: a prompt of N tokens is built without trial and error (and then checked).
        Empty for vocabularies without such tokens (the iterative :meth:`fit` takes over).
        """
        if self._words is None:
            special = set(self.tok.get_added_tokens_decoder())
            cands = []
            for tid in range(self.tok.get_vocab_size()):
                if tid in special:
                    continue
                s = self.tok.decode([tid])
                if len(s) >= 2 and s[0] == " " and s[1:].isascii() and s[1:].isalpha():
                    cands.append(s)
            encs = self.tok.encode_batch(cands, add_special_tokens=False) if cands else []
            self._words = [w for w, e in zip(cands, encs) if len(e.ids) == 1]
        return self._words

    def compose(self, head: str, target: int, rng: np.random.Generator,
                measure: Callable[[str], int] | None = None) -> str:
        """``head`` + random one-token words, sized so that ``measure`` (default :meth:`count`)
        should be ``target``. The caller checks the count and falls back to :meth:`fit` on a miss.
        """
        need = target - (measure or self.count)(head)
        if need < 0:
            raise DatasetError(self._too_short(head, target, target - need))
        words = self.words
        if need == 0 or not words:
            return head
        idx = rng.integers(0, len(words), size=need)
        return head + "".join([words[i] for i in idx])

    def _too_short(self, head: str, target: int, fixed: int) -> str:
        what = (f"the salt {head!r} with " if head else "") + (
            "the chat template and special tokens" if self.api == "chat" else "the special tokens (BOS)")
        return (f"prompt of {target} tokens with tokenizer {self.folder}: {what} alone take {fixed} tokens; "
                f"raise the ISL above {fixed}")

    def counts(self, texts: list[str]) -> list[int]:
        """:meth:`count` of many texts at once (the tokenizer's batch encoder runs in parallel)."""
        encs = self.tok.encode_batch([self.pre + t + self.post for t in texts], add_special_tokens=self.add_special)
        return [len(e.ids) for e in encs]

    def fit(self, head: str, target: int, rng: np.random.Generator,
            measure: Callable[[str], int] | None = None) -> str:
        """``head + random body`` whose ``measure`` (default :meth:`count`) is exactly ``target``.

        The general path, for any vocabulary: draw random clean tokens, decode, measure the
        whole text, then trim or extend the body's canonical re-encoding by the difference.
        """
        measure = measure or self.count
        base = measure(head)
        need = target - base
        if need < 0:
            raise DatasetError(self._too_short(head, target, base))
        if need == 0:
            return head
        clean = self.clean_ids
        for _ in range(_REDRAWS):
            body = list(rng.choice(clean, size=need))
            for _ in range(_FIT_ATTEMPTS):
                body_text = self.decode(body)
                n = measure(head + body_text)
                if n == target:
                    return head + body_text
                diff = n - target
                canon = self.content_ids(body_text)
                if diff > 0:
                    body = canon[: max(len(canon) - diff, 0)]
                else:
                    body = canon + list(rng.choice(clean, size=-diff))
                if not body:
                    break
        raise DatasetError(f"could not fit a prompt to exactly {target} tokens with tokenizer {self.folder} "
                           f"after {_REDRAWS} draws; report this with the tokenizer")


def _chat_frame(folder: Path) -> tuple[str, str]:
    """The rendered chat template around one user message: (text before it, text after it)."""
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not template and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    if not template:
        raise DatasetError(f"tokenizer {folder}: no chat_template in tokenizer_config.json or chat_template.jinja; "
                           "use 'api: completions' or give the model a chat template")

    def tok_str(key: str) -> str:
        v = cfg.get(key) or ""
        return v.get("content", "") if isinstance(v, dict) else str(v)

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str) -> None:
        raise jinja2.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, **kw)
    env.globals["raise_exception"] = raise_exception
    rendered = env.from_string(template).render(
        messages=[{"role": "user", "content": _SENTINEL}], add_generation_prompt=True,
        bos_token=tok_str("bos_token"), eos_token=tok_str("eos_token"))
    if rendered.count(_SENTINEL) != 1:
        raise DatasetError(f"tokenizer {folder}: the chat template does not place the user message once")
    pre, post = rendered.split(_SENTINEL)
    return pre, post


@lru_cache(maxsize=8)
def load_tokenizer(folder: str, api: Api = "completions") -> PromptTokenizer:
    return PromptTokenizer(Path(folder), api)


def _salt_head(salt: str, label: str) -> str:
    # Ends in ':' (not a space) so the first word's leading space stays with that word.
    return f"{salt}-{label}:" if salt else f"{label}:"


def _head_that_fits(head: str, target: int, measure: Callable[[str], int]) -> str:
    """The salt head, or a shorter one when the ISL is too small to hold it."""
    if measure(head) < target:
        return head
    short = head.split("-")[-1] if "-" in head else ""
    if short and measure(short) < target:
        return short
    return ""


def _exact(tok: PromptTokenizer, heads: list[str], target: int, rngs: list[np.random.Generator]) -> list[str]:
    """Prompts ``head + body`` of exactly ``target`` tokens: composed, checked in one batch, refitted on a miss."""
    texts = [tok.compose(h, target, r) for h, r in zip(heads, rngs)]
    for k, n in enumerate(tok.counts(texts)):
        if n != target:
            texts[k] = tok.fit(heads[k], target, rngs[k])
    return texts


def build_prompts(*, dataset: str, isl: int, osl: int, count: int, tokenizer_path: Path, api: Api = "completions",
                  seed: int = 0, salt: str = "", prefix_len: int = 0, num_prefixes: int = 1,
                  start_index: int = 0) -> list[Prompt]:
    """``count`` prompts of exactly ``isl`` server-counted tokens, for requests ``start_index``...

    Request ``i``'s random content depends only on ``(seed, i)``; ``salt`` (a per-point nonce)
    starts every prompt, or every group prefix for ``prefix_repetition``.
    """
    tok = load_tokenizer(str(tokenizer_path), api)
    empty = tok.count("")
    if isl <= empty:
        raise DatasetError(f"ISL {isl}: the {'chat template and ' if api == 'chat' else ''}special tokens of "
                           f"tokenizer {tok.folder} alone take {empty} tokens, leaving no text (vLLM rejects an "
                           f"empty prompt with HTTP 400); use an ISL of at least {empty + 1}")
    indices = range(start_index, start_index + count)
    if dataset in ("random", "prefill_only", "decode_heavy"):
        heads = [_head_that_fits(_salt_head(salt, str(i)), isl, tok.count) for i in indices]
        texts = _exact(tok, heads, isl, [np.random.default_rng([seed, i]) for i in indices])
        return [Prompt(t, isl, osl) for t in texts]
    if dataset == "prefix_repetition":
        if not (0 < prefix_len < isl):
            raise DatasetError(f"prefix_repetition: need 0 < prefix_len < isl (got {prefix_len}, {isl})")
        prefix_measure: Callable[[str], int] = lambda t: len(tok.prefix_ids(t))  # noqa: E731
        prefixes: list[tuple[str, list[int]]] = []
        for g in range(num_prefixes):
            rng = np.random.default_rng([seed, 1_000_000_000 + g])
            head = _head_that_fits(_salt_head(salt, f"p{g}"), prefix_len, prefix_measure)
            ptext = tok.compose(head, prefix_len, rng, prefix_measure)
            if prefix_measure(ptext) != prefix_len:
                ptext = tok.fit(head, prefix_len, rng, measure=prefix_measure)
            prefixes.append((ptext, tok.prefix_ids(ptext)))
        heads = [prefixes[i % num_prefixes][0] + f" {i}:" for i in indices]
        rngs = [np.random.default_rng([seed, i]) for i in indices]
        texts = _exact(tok, heads, isl, rngs)
        out = []
        for i, text in zip(indices, texts):
            g = i % num_prefixes
            pids = prefixes[g][1]
            if tok.ids(text)[: len(pids)] != pids:
                raise DatasetError(f"prefix_repetition: request {i}'s suffix merges into the shared prefix "
                                   f"with tokenizer {tok.folder}; report this with the tokenizer")
            out.append(Prompt(text, isl, osl, group=g))
        return out
    raise DatasetError(f"dataset '{dataset}': unknown; use random, prefix_repetition, prefill_only or decode_heavy")


def build_workload_prompts(workload, tokenizer_path: Path, count: int, *, salt: str, start_index: int = 0) -> list[Prompt]:
    """:func:`build_prompts` with the lengths and kind of a :class:`pdperf.specs.Workload`."""
    return build_prompts(dataset=workload.dataset, isl=workload.isl, osl=workload.osl, count=count,
                         tokenizer_path=tokenizer_path, api=workload.api, seed=workload.seed, salt=salt,
                         prefix_len=workload.prefix_len, num_prefixes=workload.num_prefixes,
                         start_index=start_index)
