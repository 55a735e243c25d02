"""pdperf.greedy: the PD smoke check's request (against the named loopback stub, for what the
client does with a server that leaves ids out) and its verdict (pure). The check itself runs on
the real CPU stack: tests/smoke/test_smoke.py::test_pd_greedy_matches_collocated."""

from __future__ import annotations

import pytest

from pdperf.greedy import GreedyOutput, compare_greedy, greedy_tokens
from pdperf.loadgen.stub_server import StubBehavior, StubServerThread
from pdperf.waiting import free_port

pytestmark = pytest.mark.selftest


def test_greedy_tokens_says_what_the_server_left_out():
    """The stub names no token ids (logprobs null), as a server that ignores
    return_tokens_as_token_ids would: the check fails with that, not with [] == []."""
    with StubServerThread(StubBehavior(ttft_s=0.0)) as stub:
        with pytest.raises(RuntimeError, match=r"named no token ids \(logprobs missing\); text ' tok tok'"):
            greedy_tokens(stub.url, "stub-model", "hello", 2)
        assert stub.last_body["logprobs"] == 2 and stub.last_body["return_tokens_as_token_ids"] is True
    with pytest.raises(RuntimeError, match="URLError"):
        greedy_tokens(f"http://127.0.0.1:{free_port()}", "m", "hello", 2, timeout_s=5)


def test_same_ids_match():
    assert compare_greedy(GreedyOutput([1, 2, 3]), GreedyOutput([1, 2, 3])).status == "match"


def test_a_clear_difference_is_a_failed_handoff():
    pd = GreedyOutput([1, 2, 9, 9], "x", [1.0, 2.0, 0.8, 1.0])
    ref = GreedyOutput([1, 2, 3, 4], "y", [1.0, 2.0, 1.5, 1.0])
    v = compare_greedy(pd, ref)
    assert v.status == "differs"
    assert v.message.startswith("first differs at token 2: PD 9, collocated 3 (margin 0.800 nats)")
    assert "[1, 2, 9, 9] 'x'" in v.message and "[1, 2, 3, 4] 'y'" in v.message


def test_a_near_tie_where_they_part_is_noise_not_a_failure():
    """vLLM's dummy weights: near-uniform logits, another batch shape flips the argmax."""
    pd = GreedyOutput([5, 7, 7], margins=[0.3, 0.002, 0.4])
    ref = GreedyOutput([5, 8, 8], margins=[0.3, 0.01, 0.4])
    v = compare_greedy(pd, ref)
    assert v.status == "near_tie" and "token 1" in v.message and "margin 0.0020 nats < 0.05" in v.message
    assert compare_greedy(pd, ref, near_tie_nats=0.001).status == "differs"


def test_without_margins_a_difference_fails_and_a_shorter_stream_differs_where_it_ended():
    assert compare_greedy(GreedyOutput([1, 2]), GreedyOutput([1, 3])).message.endswith(
        "(no margin reported)\nPD:         [1, 2] ''\ncollocated: [1, 3] ''")
    v = compare_greedy(GreedyOutput([1]), GreedyOutput([1, 2]))
    assert v.status == "differs" and "token 1: PD (ended), collocated 2" in v.message
