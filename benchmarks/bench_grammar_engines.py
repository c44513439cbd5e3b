"""Which grammar engine for structured outputs: xgrammar, llguidance or outlines-core, measured on this CPU.

    pip install xgrammar llguidance outlines-core
    python benchmarks/bench_grammar_engines.py [--model PATH] [--batch 32]

With the embedded SmolLM2 tokenizer (vocab 49152) and one nested JSON schema (objects in objects, an enum, an
array of objects, bounded strings), each engine is timed on:

* **compile**: the schema -> a compiled grammar bound to the tokenizer, cold (no cache), the median of a few runs;
* **mask/step**: ``--batch`` matchers (one per request) walk a valid document of that schema token by token; at
  every step the next-token bitmask of all of them is filled with the library's own matcher and bitmask API
  (the figure a decoding step waits for if the fill does not overlap the forward), mean and worst over the walk;
* **coverage**: JSON schema, regex, a choice of strings, and EBNF-style context-free grammars.

It also times applying a batch-32 bitmask to the logits two ways (unpacked to a bool mask + ``masked_fill``,
and xgrammar's ``apply_token_bitmask_inplace``). Figures on the project's 2-core CPU (shared, loaded):

    engine                 compile ms mask/step ms  worst ms
    xgrammar 0.2.9               10.7         0.27      4.49
    llguidance 1.9.1              2.6         3.20     20.86
    outlines-core 0.2.14       1217.2         1.62     11.81
    apply [32, 49152]: unpack + masked_fill 21.0 ms, apply_token_bitmask_inplace 12.1 ms (a logits copy
    included in both; the copy alone took about as long as the latter)

hence xgrammar, applied with its own kernel (``dist_infer/structured_output/__init__.py`` says why at length).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 4},
        "friends": {
            "type": "array",
            "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                         "close": {"type": "boolean"}},
                      "required": ["name", "close"], "additionalProperties": False},
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "role", "address", "tags", "friends"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "role": "admin", "address": {"city": "London", "zip": "12345"},
            "tags": ["math", "poetry"],
            "friends": [{"name": "Charles", "close": True}, {"name": "Mary", "close": False}]}


def _version(dist: str) -> str:
    from importlib.metadata import version

    return f"{dist} {version(dist)}"


def _median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _walk(fill_all, advance_all, tokens: list[int]) -> tuple[float, float]:
    """Fills every matcher's mask, then advances every matcher by the next document token; (mean, max) seconds
    of the fills over the walk."""
    times = []
    for token in tokens:
        start = time.perf_counter()
        fill_all()
        times.append(time.perf_counter() - start)
        advance_all(token)
    return statistics.mean(times), max(times)


def bench_xgrammar(tokenizer, vocab_size: int, tokens: list[int], batch: int, repeat: int) -> dict:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    schema = json.dumps(SCHEMA)
    compile_s = _median_seconds(
        lambda: xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(schema), repeat)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(schema)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    bitmask = xgr.allocate_token_bitmask(batch, info.vocab_size)

    def fill_all():
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    def advance_all(token):
        for m in matchers:
            assert m.accept_token(token), "xgrammar refused a token of the valid document"

    mean_s, max_s = _walk(fill_all, advance_all, tokens)
    return dict(engine=_version("xgrammar"), compile=compile_s, mask_mean=mean_s, mask_max=max_s,
                json="yes", regex="yes", choice="yes (EBNF alternatives)", ebnf="yes (GBNF-style EBNF)")


def bench_llguidance(tokenizer, vocab_size: int, tokens: list[int], batch: int, repeat: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))

    def compile_once():
        m = llguidance.LLMatcher(lltok, grammar)
        assert not m.is_error(), m.get_error()
        bm = llguidance.torch.allocate_token_bitmask(1, lltok.vocab_size)
        llguidance.torch.fill_next_token_bitmask(m, bm, 0)  # llguidance builds lazily: count the first mask

    compile_s = _median_seconds(compile_once, repeat)
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(batch)]
    bitmask = llguidance.torch.allocate_token_bitmask(batch, lltok.vocab_size)

    def fill_all():
        for i, m in enumerate(matchers):
            llguidance.torch.fill_next_token_bitmask(m, bitmask, i)

    def advance_all(token):
        for m in matchers:
            assert m.consume_token(token), f"llguidance refused a token of the valid document: {m.get_error()}"

    mean_s, max_s = _walk(fill_all, advance_all, tokens)
    return dict(engine=_version("llguidance"), compile=compile_s,
                mask_mean=mean_s, mask_max=max_s, json="yes", regex="yes", choice="yes (Lark alternatives)",
                ebnf="yes (Lark syntax)")


def _byte_level_vocabulary(tokenizer):
    """outlines-core's Vocabulary from a byte-level BPE tokenizer: token text as raw bytes (GPT-2's
    byte-to-unicode table reversed), special tokens left out."""
    from outlines_core import Vocabulary

    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    decode = {chr(c): b for b, c in zip(bs, cs)}
    special = set(tokenizer.all_special_ids)
    table: dict[bytes, list[int]] = {}
    for text, token_id in tokenizer.get_vocab().items():
        if token_id in special:
            continue
        table.setdefault(bytes(decode[ch] for ch in text), []).append(token_id)
    return Vocabulary(tokenizer.eos_token_id, table)


def bench_outlines_core(tokenizer, vocab_size: int, tokens: list[int], batch: int, repeat: int) -> dict:
    from outlines_core import Guide, Index
    from outlines_core.json_schema import build_regex_from_schema
    from outlines_core.kernels.torch import allocate_token_bitmask, fill_next_token_bitmask

    vocabulary = _byte_level_vocabulary(tokenizer)
    regex = build_regex_from_schema(json.dumps(SCHEMA))
    compile_s = _median_seconds(lambda: Index(regex, vocabulary), repeat)
    index = Index(regex, vocabulary)
    guides = [Guide(index) for _ in range(batch)]
    bitmask = allocate_token_bitmask(vocab_size).repeat(batch, 1)

    def fill_all():
        for i, g in enumerate(guides):
            fill_next_token_bitmask(g, bitmask[i:i + 1])

    def advance_all(token):
        for g in guides:
            g.advance(token)

    mean_s, max_s = _walk(fill_all, advance_all, tokens)
    return dict(engine=_version("outlines-core"), compile=compile_s,
                mask_mean=mean_s, mask_max=max_s, json="yes (via regex)", regex="yes",
                choice="yes (via regex)", ebnf="no")


def bench_apply(vocab_size: int, batch: int, repeat: int = 20) -> None:
    """Applying a filled bitmask to [B, V] float32 logits: unpacked to a bool mask + ``masked_fill`` (how
    ``SamplingBatch.allowed`` applies it) against xgrammar's own ``apply_token_bitmask_inplace``."""
    import torch
    import xgrammar as xgr

    from dist_infer.structured_output.batch_mask import unpack_bitmask

    logits = torch.randn(batch, vocab_size)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (batch, (vocab_size + 31) // 32), dtype=torch.int32)

    def ours():
        logits.clone().masked_fill_(~unpack_bitmask(bitmask, vocab_size), float("-inf"))

    def theirs():
        xgr.apply_token_bitmask_inplace(logits.clone(), bitmask)

    a, b = _median_seconds(ours, repeat), _median_seconds(theirs, repeat)
    print(f"\napply a [{batch}, {vocab_size}] mask to float32 logits (incl. a clone): unpack + masked_fill "
          f"{a * 1e3:.2f} ms, xgrammar apply_token_bitmask_inplace {b * 1e3:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model folder (default: the embedded SmolLM2)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="cold compiles per engine (median)")
    parser.add_argument("--engines", default="xgrammar,llguidance,outlines-core")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from dist_infer.model_loader.resolve import resolve_model_path

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    vocab_size = len(tokenizer)
    tokens = tokenizer.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False)
    print(f"tokenizer vocab {vocab_size}, document {len(tokens)} tokens, batch {args.batch}")
    benches = {"xgrammar": bench_xgrammar, "llguidance": bench_llguidance, "outlines-core": bench_outlines_core}
    rows = []
    for name in args.engines.split(","):
        try:
            rows.append(benches[name](tokenizer, vocab_size, tokens, args.batch, args.repeat))
        except ImportError as e:
            print(f"{name}: not installed ({e})")
    print(f"\n{'engine':<22} {'compile ms':>10} {'mask/step ms':>12} {'worst ms':>9}  json / regex / choice / EBNF")
    for r in rows:
        print(f"{r['engine']:<22} {r['compile'] * 1e3:>10.1f} {r['mask_mean'] * 1e3:>12.2f} {r['mask_max'] * 1e3:>9.2f}"
              f"  {r['json']} / {r['regex']} / {r['choice']} / {r['ebnf']}")
    if "xgrammar" in args.engines:
        bench_apply(vocab_size, args.batch)


if __name__ == "__main__":
    main()
