"""``perplexity`` (what ``dist-infer eval-ppl`` prints) equals the perplexity Hugging Face's model gives the same
corpus tokens, window by window, however the windows are cut into chunks read back from the paged KV cache."""

from __future__ import annotations

import pytest

from dist_infer.eval.perplexity import perplexity
from ppl_reference import hf_perplexity


@pytest.mark.parametrize("max_tokens,window,chunk", [
    (300, 128, 48),   # windows 128, 128, 44; chunks of 48 that do not divide the window
    (257, 128, 128),  # the last window is one token long: it predicts nothing
])
def test_perplexity_matches_hugging_face(tiny_llama_with_tokenizer, max_tokens, window, chunk):
    expected, predicted = hf_perplexity(tiny_llama_with_tokenizer, max_tokens, window)
    ours = perplexity(max_tokens, window, chunk, show_progress=False, model=tiny_llama_with_tokenizer,
                      dtype="float32")
    assert ours["tokens"] == predicted
    assert ours["perplexity"] == pytest.approx(expected, rel=1e-4)
