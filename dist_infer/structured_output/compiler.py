"""Grammar specs -> xgrammar ``CompiledGrammar``s bound to the model's vocabulary, cached by spec.

Compiling a JSON schema against a 49k-token vocabulary takes tens to hundreds of milliseconds (xgrammar
precomputes which tokens each grammar position can take); the same schema sent again (the common case: one
client, one schema) is a cache hit. The vocabulary is padded to the model's ``vocab_size`` (the logits' width,
which may exceed the tokenizer's): the padding ids are never allowed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from dist_infer.structured_output.spec import ANY_WHITESPACE, SEPARATORS, GrammarSpec


class GrammarCompiler:
    """Thread-safe; ``hits`` and ``misses`` count cache lookups."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids, cache_size: int = 64):
        import xgrammar as xgr

        self._xgr = xgr
        stops = sorted(t for t in stop_token_ids if t < vocab_size)
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops or None)
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(self.info.stop_token_ids)
        self._compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)  # the cache is ours, keyed by spec
        self._cache: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def compile(self, spec: GrammarSpec):
        key = (spec.kind, spec.text)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self.hits += 1
                self._cache.move_to_end(key)
                return compiled
            self.misses += 1
            compiled = self._compile(spec)
            self._cache[key] = compiled
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return compiled

    def _compile(self, spec: GrammarSpec):
        c = self._compiler
        if spec.kind == "json":
            return c.compile_json_schema(spec.text, any_whitespace=ANY_WHITESPACE, separators=SEPARATORS,
                                              strict_mode=True)
        if spec.kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', any_whitespace=ANY_WHITESPACE,
                                              separators=SEPARATORS, strict_mode=False)
        if spec.kind == "regex":
            return c.compile_regex(spec.text)
        return c.compile_grammar(spec.text)
