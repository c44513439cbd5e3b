"""Masking for the text ``--log-requests`` writes to the log: the server's own API keys, secret-looking tokens,
e-mail addresses, card-like digit runs and phone numbers are replaced by ``[API-KEY]``, ``[SECRET]``,
``[EMAIL]``, ``[CARD]`` and ``[PHONE]``.

Masking is best effort (a name or an address in free text stays); it exists so that opting in to prompt logs
does not also write the obvious secrets and identifiers into them. Without ``--log-requests`` no prompt or
completion text is logged at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

API_KEY, SECRET, EMAIL, CARD, PHONE = "[API-KEY]", "[SECRET]", "[EMAIL]", "[CARD]", "[PHONE]"

_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
                          re.DOTALL)
_BEARER = re.compile(r"(?i)\b(bearer|basic)(\s+)([A-Za-z0-9._~+/=-]{7,}[A-Za-z0-9_~+/=-])")  # not a final '.' 
_ASSIGNED = re.compile(r"(?i)\b((?:api[_-]?key|secret|password|passwd|token|access[_-]?key)\s*[:=]\s*)"
                       r"(?![\[\s])([^\s,;'\"]{6,})")
_TOKENS = re.compile("|".join([
    r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{8,}",  # OpenAI, Stripe, Anthropic style (sk-..., sk-proj-..., sk-ant-...)
    r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[A-Z0-9]{16}\b",  # AWS access key ids
    r"\bgh[pousr]_[A-Za-z0-9]{20,}",  # GitHub
    r"\bgithub_pat_[A-Za-z0-9_]{20,}",
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}",  # Slack
    r"\bAIza[0-9A-Za-z_-]{35}",  # Google API keys
    r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWTs
    r"\b[0-9a-fA-F]{32,}\b",  # long hex (hashes, hex-encoded keys)
]))
_BASE64ISH = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{32,}={0,2}")
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
# 13-19 digits, single spaces or dashes between; not the decimals of a number ("3.14159265358979")
_CARD = re.compile(r"(?<![\d.,-])\d(?:[ -]?\d){12,18}(?![\d-])")
_PHONES = [
    re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\w)"),  # international: +44 20 7946 0958
    re.compile(r"(?<![\w(])(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\w)"),  # (555) 123-4567, 555.123.4567
    re.compile(r"(?<![\w.,-])\d{10,12}(?![\w-])"),  # a bare run of 10-12 digits
]


class Redactor:
    """``redactor(text)``: ``text`` with secrets and identifiers masked."""

    def __init__(self, secrets: Iterable[str] = ()):
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._own = re.compile("|".join(map(re.escape, self._secrets))) if self._secrets else None

    def keys_only(self, text: str) -> str:
        """Just the server's own keys masked: applied to every log line."""
        return self._own.sub(API_KEY, text) if self._own is not None else text

    def __call__(self, text: str) -> str:
        text = self.keys_only(text)
        text = _PRIVATE_KEY.sub(SECRET, text)
        text = _BEARER.sub(_credential, text)
        text = _ASSIGNED.sub(lambda m: m.group(1) + SECRET, text)
        text = _TOKENS.sub(SECRET, text)
        text = _BASE64ISH.sub(_base64ish, text)
        text = _EMAIL.sub(EMAIL, text)
        text = _CARD.sub(CARD, text)
        for pattern in _PHONES:
            text = pattern.sub(_phone, text)
        return text


def _credential(match: re.Match) -> str:
    """``Bearer <token>`` / ``Basic <token>``, unless the "token" is a plain lowercase word ("basic training")."""
    scheme, space, token = match.groups()
    return match.group(0) if token.isalpha() and token.islower() else f"{scheme}{space}{SECRET}"


def _base64ish(match: re.Match) -> str:
    """A long run of base64 characters is a secret when it mixes digits with letters (not a long word)."""
    s = match.group(0)
    has_digit, has_alpha = any(c.isdigit() for c in s), any(c.isalpha() for c in s)
    return SECRET if has_digit and has_alpha else s


def _phone(match: re.Match) -> str:
    digits = sum(c.isdigit() for c in match.group(0))
    return PHONE if 7 <= digits <= 15 else match.group(0)
