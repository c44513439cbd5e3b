"""Engine outputs -> OpenAI response pieces: logprobs in each endpoint's layout, usage."""

from __future__ import annotations

from dist_infer.outputs import Logprob


def _text(entry: Logprob, token_id: int, tokenizer) -> str:
    return entry.decoded_token if entry.decoded_token is not None else tokenizer.decode([token_id])


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], num_top: int, tokenizer,
                        offset: int = 0) -> dict:
    """The legacy completions layout: parallel lists of tokens, their logprobs, top alternatives, offsets."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, logprobs):
        text = _text(entry[token_id], token_id, tokenizer)
        tokens.append(text)
        token_logprobs.append(entry[token_id].logprob)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
        tops.append({_text(lp, t, tokenizer): lp.logprob for t, lp in ranked if lp.rank is not None
                     and lp.rank <= num_top} if num_top else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], num_top: int, tokenizer) -> dict:
    """The chat layout: one entry per token with its bytes and its top alternatives."""
    content = []
    for token_id, entry in zip(token_ids, logprobs):
        text = _text(entry[token_id], token_id, tokenizer)
        ranked = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= num_top),
                        key=lambda kv: kv[1].rank)
        content.append({
            "token": text, "logprob": entry[token_id].logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": _text(lp, t, tokenizer), "logprob": lp.logprob,
                              "bytes": list(_text(lp, t, tokenizer).encode())} for t, lp in ranked],
        })
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
