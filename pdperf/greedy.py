"""The smoke tier's PD check: greedy token ids through PD against a collocated engine's.

A wrong KV handoff (vLLM issue 27055: a transport that corrupts blocks) shows as different greedy
output. Three things keep the comparison honest:

- **ids, not text**: with the GPU shapes' small local tokenizer most of Llama's ids have no text,
  and two streams of 24 tokens can both decode to "" (the ninth GPU session's pass compared texts);
- **context that matters**: the caller's prompts differ in their context and end alike, so ids that
  differ between prompts come from the context, which reaches a PD decode engine only as KV; when
  every prompt gets the same ids the check cannot see a wrong handoff (``inconclusive``);
- **near ties**: where the two first differ, a top-two logprob margin under ``near_tie_nats`` on
  either side means numerical noise (another batch shape, another kernel) can pick either token:
  vLLM's dummy weights give near-uniform logits. That is ``near_tie``, not a failed handoff.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from pdperf.loadgen.client import SSEParser, build_body, endpoint_url

NEAR_TIE_NATS = 0.05


@dataclass
class GreedyOutput:
    ids: list[int]
    text: str = ""
    margins: list[float | None] = field(default_factory=list)  # per token: its logprob minus the runner-up's


def greedy_tokens(base_url: str, model: str, prompt: str, max_tokens: int, *,
                  timeout_s: float = 300.0) -> GreedyOutput:
    """One streamed greedy request's token ids, text and margins: vLLM's
    ``return_tokens_as_token_ids`` with ``logprobs: 2`` names every sampled token as
    ``token_id:N`` with its runners-up. Raises RuntimeError (with the server's answer) when the
    request fails or names no ids."""
    body = build_body(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                      extra={"logprobs": 2, "return_tokens_as_token_ids": True})
    req = urllib.request.Request(endpoint_url(base_url, "completions"), data=body,
                                 headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"HTTP {e.code}: {e.read()[:500].decode('utf-8', 'replace')}") from None
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"{type(e).__name__}: {getattr(e, 'reason', None) or e}") from None
    out = GreedyOutput(ids=[])
    text: list[str] = []
    for payload in SSEParser().feed(raw):
        if payload.strip() == b"[DONE]":
            break
        event = json.loads(payload)
        if "error" in event:
            raise RuntimeError(f"error event mid-stream: {json.dumps(event['error'])[:500]}")
        for choice in event.get("choices") or []:
            text.append(choice.get("text") or "")
            lp = choice.get("logprobs") or {}
            tokens, chosen, tops = lp.get("tokens") or [], lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
            for j, tok in enumerate(tokens):
                if not str(tok).startswith("token_id:"):
                    raise RuntimeError(f"the server named a token {tok!r}, not 'token_id:N': it ignored "
                                       f"return_tokens_as_token_ids")
                out.ids.append(int(str(tok).split(":", 1)[1]))
                top = tops[j] if j < len(tops) and isinstance(tops[j], dict) else {}
                others = [v for k, v in top.items() if k != tok and v is not None]
                mine = chosen[j] if j < len(chosen) else None
                out.margins.append(mine - max(others) if mine is not None and others else None)
    if not out.ids:
        raise RuntimeError(f"the stream named no token ids (logprobs missing); text {''.join(text)!r}")
    out.text = "".join(text)
    return out


@dataclass
class GreedyVerdict:
    status: str  # "match" | "differs" | "near_tie"
    message: str = ""


def compare_greedy(pd: GreedyOutput, ref: GreedyOutput, *, near_tie_nats: float = NEAR_TIE_NATS) -> GreedyVerdict:
    """PD's greedy output against the collocated reference's, token for token."""
    if pd.ids == ref.ids:
        return GreedyVerdict("match")
    i = next((k for k, (a, b) in enumerate(zip(pd.ids, ref.ids)) if a != b), min(len(pd.ids), len(ref.ids)))
    margins = [v for m in (pd.margins, ref.margins) if i < len(m) and (v := m[i]) is not None]
    where = (f"first differs at token {i}: PD {pd.ids[i] if i < len(pd.ids) else '(ended)'}, collocated "
             f"{ref.ids[i] if i < len(ref.ids) else '(ended)'}")
    if margins and min(margins) < near_tie_nats:
        return GreedyVerdict("near_tie", f"{where}, a near tie there (top-two logprob margin {min(margins):.4f} "
                                         f"nats < {near_tie_nats}): numerical noise picks either token")
    margin = f"margin {min(margins):.3f} nats" if margins else "no margin reported"
    return GreedyVerdict("differs", f"{where} ({margin})\nPD:         {pd.ids} {pd.text!r}\n"
                                    f"collocated: {ref.ids} {ref.text!r}")
