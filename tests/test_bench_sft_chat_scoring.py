"""bench/sft_chat.py's scoring is pure: a wrong count there once reported a refusing model as never refusing."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_NO_TCMALLOC", "1")  # the bench re-execs itself under tcmalloc at import otherwise
        spec = importlib.util.spec_from_file_location("sft_chat_bench", ROOT / "bench" / "sft_chat.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def test_refusal_is_recognised_after_squad_normalisation(bench):
    assert bench.refuses("The passage does not say.", exact=True)
    assert bench.refuses("the passage does not say", exact=True)
    assert bench.refuses("The passage does not specify how many years it took.")
    assert not bench.refuses("The passage does not specify how many years it took.", exact=True)
    assert not bench.refuses("The passage says it was 1850.")
    assert not bench.refuses("In the passage, Paris. The passage does not say more.")


def test_score_counts_refusals_and_false_refusals(bench):
    def chat(kind, answer):
        return {"tasks": [kind], "messages": [{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": answer}]}
    rows = [chat("qa_unanswerable", "The passage does not say."), chat("qa_unanswerable", "The passage does not say."),
            chat("qa", "1850"), chat("qa", "Paris"), chat("sentiment_en", "Positive")]
    replies = ["The passage does not say.", "In 1850.", "1850", "The passage does not mention Paris.", "It is negative."]
    s = bench.score(rows, replies, [True, True, True, False, True], [5, 3, 1, 5, 4])
    assert s["qa_unanswerable"] == {"says_not_in_passage": 0.5, "says_not_in_passage_exact": 0.5, "n": 2}
    assert s["qa"]["false_refusals"] == 0.5 and s["qa"]["false_refusals_exact"] == 0.0
    assert s["qa"]["exact_match"] == 50.0
    assert s["sentiment_en"]["accuracy"] == 0.0 and s["stopped"] == 0.8 and s["mean_reply_tokens"] == 3.6
