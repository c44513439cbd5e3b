"""API keys: who may call the server, and under which name metrics and logs know them.

One key comes from ``--api-key`` or ``$DIST_INFER_API_KEY`` and is named ``default``; ``--api-key-file FILE``
adds any number, one ``name: key`` a line (blank lines and ``#`` comments allowed)::

    # team keys; rotate by editing this file and restarting
    alice: sk-3f1b...
    batch-jobs: sk-91c0...

A bad line, a repeated name, a repeated key or an empty key is an error naming the file and the line. A request
is matched against every key in constant time (SHA-256 digests compared with ``hmac.compare_digest``, all of
them, without stopping at the first match), and only the key's name ever leaves this module.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import stat

DEFAULT_NAME = "default"  # the key given with --api-key / $DIST_INFER_API_KEY
NO_KEY = "none"  # metric / log value when the server has no key at all
UNAUTHENTICATED = "unauthenticated"  # the server has keys and the request presented none that is valid
_RESERVED = {NO_KEY, UNAUTHENTICATED}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_KEY = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")  # printable ASCII, no surrounding whitespace


class APIKeys:
    """Named keys; empty means the server is open."""

    def __init__(self, keys: dict[str, str] | None = None):
        keys = dict(keys or {})
        for name, key in keys.items():
            _check_name(name, "a key name")
            _check_key(key, f"the key {name!r}")
        if len(set(keys.values())) != len(keys):
            raise ValueError("two key names share the same key")
        self._digests = [(name, _digest(key)) for name, key in keys.items()]
        self._secrets = tuple(keys.values())

    @classmethod
    def load(cls, single: str | None = None, single_source: str = "--api-key", key_file: str | None = None) -> APIKeys:
        """The single key (named ``default``) plus the keys of ``key_file``; errors name where the bad key is."""
        entries: list[tuple[str, str, str]] = []  # name, key, where
        if single is not None:
            if single == "":
                raise ValueError(f"{single_source} is set but empty: every request would be refused. Give a "
                                 f"non-empty key, or unset {single_source} to serve without one")
            _check_key(single, single_source)
            entries.append((DEFAULT_NAME, single, single_source))
        if key_file is not None:
            entries.extend(read_key_file(key_file))
        names: dict[str, str] = {}
        keys: dict[bytes, tuple[str, str]] = {}
        for name, key, where in entries:
            if name in names:
                raise ValueError(f"{where}: the name {name!r} is already used ({names[name]})")
            digest = _digest(key)
            if digest in keys:
                other, other_where = keys[digest]
                raise ValueError(f"{where}: the key of {name!r} is the same as the key of {other!r} ({other_where})")
            names[name], keys[digest] = where, (name, where)
        return cls({name: key for name, key, _ in entries})

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._digests]

    def secrets(self) -> tuple[str, ...]:
        """The keys themselves, for masking them out of logs (never for printing)."""
        return self._secrets

    def identify(self, authorization: str | None) -> str | None:
        """The name of the key an ``Authorization: Bearer <key>`` header carries, or None."""
        given = bearer_token(authorization)
        if given is None or not self._digests:
            return None
        digest = _digest(given)
        found = None
        for name, expected in self._digests:  # every key, whatever matched before
            if hmac.compare_digest(digest, expected) and found is None:
                found = name
        return found

    def __repr__(self) -> str:  # never the keys
        return f"APIKeys(names={self.names})"


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def read_key_file(path: str) -> list[tuple[str, str, str]]:
    """``(name, key, "path:line")`` for each key line of an API key file."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read the API key file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the API key file is not UTF-8 text") from None
    out = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        name, colon, key = line.partition(":")
        name, key = name.strip(), key.strip()
        if not colon or not name:
            raise ValueError(f"{where}: expected 'name: key'")
        _check_name(name, "the name", where)
        if not key:
            raise ValueError(f"{where}: the key of {name!r} is empty")
        _check_key(key, f"the key of {name!r}", where)
        out.append((name, key, where))
    if not out:
        raise ValueError(f"{path}: the API key file holds no keys (expected lines of 'name: key')")
    return out


def startup_warnings(host: str, keys: APIKeys, key_on_command_line: bool, key_file: str | None) -> list[str]:
    """What an operator should hear about before the server starts taking requests."""
    out = []
    if not keys.enabled and not is_loopback(host):
        out.append(f"serving on {host or 'every interface'} without an API key: anyone who can reach the port "
                   "can use the model. Set DIST_INFER_API_KEY or pass --api-key-file FILE")
    if key_on_command_line:
        out.append("the key given with --api-key is visible to other users of this machine (ps, /proc); pass it "
                   "in $DIST_INFER_API_KEY or in a file with --api-key-file instead")
    if key_file is not None:
        try:
            mode = os.stat(key_file).st_mode
        except OSError:
            mode = 0
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            out.append(f"the API key file {key_file} can be read by other users (mode {stat.S_IMODE(mode):o}); "
                       f"chmod 600 it")
    return out


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _check_name(name: str, what: str, where: str | None = None) -> None:
    prefix = f"{where}: " if where else ""
    if not _NAME.fullmatch(name):
        raise ValueError(f"{prefix}{what} {name!r} must be 1-64 letters, digits, '.', '_' or '-' (starting with a "
                         f"letter or digit)")
    if name in _RESERVED:
        raise ValueError(f"{prefix}{what} {name!r} is reserved (metrics use it for requests without a key)")


def _check_key(key: str, what: str, where: str | None = None) -> None:
    prefix = f"{where}: " if where else ""
    if not key:
        raise ValueError(f"{prefix}{what} is empty")
    if not _KEY.fullmatch(key):
        raise ValueError(f"{prefix}{what} must be printable ASCII without leading or trailing whitespace "
                         f"(it travels in an HTTP header)")
