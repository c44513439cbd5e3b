"""Output text grown token by token, as the tokenizer would decode the whole sequence.

``tokenizers.decoders.DecodeStream`` keeps the decoder's state between tokens and returns a chunk only once
it is valid text, so a character whose UTF-8 bytes span several tokens is never split. It starts from the
end of the prompt so that the first output token gets the spacing it has in context.
"""

from __future__ import annotations

_PROMPT_CONTEXT = 6  # prompt tokens fed to the stream for spacing context


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        from tokenizers.decoders import DecodeStream

        self._backend = _backend_tokenizer(tokenizer)
        self._stream = DecodeStream(ids=list(prompt_token_ids[-_PROMPT_CONTEXT:]),
                                    skip_special_tokens=skip_special_tokens)

    def step(self, token_ids: list[int]) -> str:
        """Appends tokens; returns the text they completed ('' while a character is still partial)."""
        pieces = []
        for token in token_ids:
            chunk = self._stream.step(self._backend, token)
            if chunk:
                pieces.append(chunk)
        return "".join(pieces)


def _backend_tokenizer(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} has no fast (tokenizers) backend; dist-infer needs a tokenizer.json")
    return backend
