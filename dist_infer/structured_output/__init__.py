"""Structured outputs: the sampled tokens are constrained to a JSON schema, any JSON object, a regex, a choice
of strings or an EBNF grammar (``SamplingParams.structured_outputs``), with xgrammar as the grammar engine.

Modules: ``spec`` (a ``StructuredOutputsParams`` -> the one grammar it names; checked without a tokenizer where
the request is made), ``compiler`` (grammar -> compiled against the model's vocabulary, cached by spec),
``request_grammar`` (one request's matcher, kept in step with its output, replayed after a resend),
``batch_mask`` (the step's [B, V] mask, filled on a background thread while the model runs, on the sampling
rank).

Why xgrammar (``benchmarks/bench_grammar_engines.py`` on this project's 2-core CPU, shared and loaded; SmolLM2's
49152-token vocabulary; a nested JSON schema; 32 matchers walking a 65-token valid document):

    engine                compile ms   mask/step ms (32 rows)   worst ms   json / regex / choice / EBNF
    xgrammar 0.2.9              10.7           0.27                 4.5    yes / yes / yes / yes (GBNF-like)
    llguidance 1.9.1             2.6           3.20                20.9    yes / yes / yes / yes (Lark)
    outlines-core 0.2.14      1217.2           1.62                11.8    yes (via regex) / yes / yes / no

The mask is needed every step, compilation once per schema (then cached): xgrammar fills a batch-32 mask
about 12x faster than llguidance and 6x faster than outlines-core, compiles a schema in ~10 ms (outlines-core
needs over a second), covers all four kinds, and ships a kernel that applies its packed bitmask to the logits
(CPU and CUDA). Its cost here: the wheel depends on triton (large), and a length-bounded JSON string lets raw
control characters through (worked around in ``spec``).
"""
