"""Keeping credentials out of logs, events, files and error messages.

Wherever a URL or a header set is recorded or quoted, it goes through here
first: :func:`redact_url` replaces the password in ``user:pw@host`` (or a
bare token in ``token@host``) and the values of credential-like query
parameters with ``***``; :func:`secrets_of` lists the strings that must never
be shown, and :func:`scrub` removes them from any text (a server's reply, a
third-party log record). :func:`redact_config` is a run's config as it is
recorded (``TrainStarted.config``, ``hparams.yaml``): plain data, with the
values of credential-like keys, header values and URLs' credentials masked.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

__all__ = [
    "MASK",
    "ScrubFilter",
    "is_secret_name",
    "redact_config",
    "redact_headers",
    "redact_url",
    "scrub",
    "secrets_of",
]

MASK = "***"

#: query parameter names whose values are credentials (matched as substrings)
_SENSITIVE = re.compile(
    r"token|key|secret|passw|pwd|auth|sig|credential|session|cookie", re.IGNORECASE
)


def _userinfo(netloc: str) -> tuple[str, str | None, str] | None:
    """``(user, password or None, host)`` of a netloc with userinfo, else None."""
    if "@" not in netloc:
        return None
    info, _, host = netloc.rpartition("@")
    user, sep, password = info.partition(":")
    return user, (password if sep else None), host


def redact_url(url: str) -> str:
    """``url`` with its credentials replaced by ``***``.

    ``https://user:pw@host/p?token=abc&n=1`` becomes
    ``https://user:***@host/p?token=***&n=1``; ``https://TOKEN@host`` becomes
    ``https://***@host``. A string that does not parse as a URL is masked whole.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    info = _userinfo(netloc)
    if info is not None:
        user, password, host = info
        netloc = f"{user}:{MASK}@{host}" if password is not None else f"{MASK}@{host}"
    query = parts.query
    if query:
        pairs = []
        for piece in query.split("&"):
            name, sep, value = piece.partition("=")
            if sep and value and _SENSITIVE.search(unquote(name)):
                value = MASK
            pairs.append(f"{name}{sep}{value}")
        query = "&".join(pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Header names with every value masked: a header set is shown, never its values."""
    return {str(name): MASK for name in (headers or {})}


def secrets_of(*, url: str | None = None, headers: Mapping[str, str] | None = None) -> list[str]:
    """The strings of ``url`` and ``headers`` that must never be shown, longest first:
    the URL's password (or bare token) and the Basic auth it makes, credential-like
    query values and every header value (also its last word: the token of ``Bearer
    <token>``), raw and percent-decoded."""
    found: set[str] = set()
    if url:
        try:
            parts = urlsplit(url)
        except ValueError:
            parts = None
        if parts is not None:
            info = _userinfo(parts.netloc)
            if info is not None:
                user, password, _ = info
                found.add(password if password is not None else user)
                # what an echoing server or proxy shows back: the Basic auth header
                credentials = f"{unquote(user)}:{unquote(password or '')}"
                found.add(base64.b64encode(credentials.encode()).decode())
            for name, value in parse_qsl(parts.query, keep_blank_values=False):
                if _SENSITIVE.search(name):
                    found.add(value)
            for piece in parts.query.split("&"):  # the raw (still encoded) form too
                name, _, value = piece.partition("=")
                if value and _SENSITIVE.search(unquote(name)):
                    found.add(value)
    for value in (headers or {}).values():
        text = str(value)
        found.add(text)
        words = text.split()
        if len(words) > 1:
            found.add(words[-1])
    found |= {unquote(s) for s in found}
    # very short strings would mask innocent text ("a", "1") and protect nothing
    return sorted((s for s in found if len(s) >= 3), key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each secret replaced by ``***``."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class ScrubFilter(logging.Filter):
    """A logging filter that scrubs ``secrets`` from each record's message.

    For third-party loggers that quote what we give them (httpx logs each
    request's URL at INFO): attach it while the secrets are in use, detach after.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = list(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub(message, self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        return True


# -- configs as recorded ---------------------------------------------------------------

#: a config key is a credential when one of its words is one of these ...
_SECRET_WORDS = frozenset(
    {
        "apikey",
        "auth",
        "authorization",
        "cookie",
        "cookies",
        "credential",
        "credentials",
        "passphrase",
        "passwd",
        "password",
        "pwd",
        "secret",
        "token",
    }
)
#: ... or when it is ``<one of these>_key`` (``api_key``, ``accessKey``), not any ``key``
#: (``run_key``, ``monitor_key`` and ``keys`` are names, not credentials)
_KEY_QUALIFIERS = frozenset(
    {"access", "api", "auth", "client", "encryption", "license", "master", "private", "signing"}
)
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def is_secret_name(name: str) -> bool:
    """True if a config key named ``name`` holds a credential (``api_key``,
    ``hf_token``, ``dbPassword``, ``Authorization``), judged by its words."""
    words = [w.lower() for w in _WORD.findall(name)]
    if any(w in _SECRET_WORDS for w in words):
        return True
    return any(
        w == "key" and i > 0 and words[i - 1] in _KEY_QUALIFIERS for i, w in enumerate(words)
    )


def redact_config(value: Any) -> Any:
    """``value`` as plain data to record, with its credentials masked (``***``).

    Mappings become dicts with string keys, sequences lists; numbers, strings,
    booleans and ``None`` stay; anything else becomes plain data through
    msgspec (a Struct, a dataclass) or its ``str()``. Masked: every value under a
    credential-like key (:func:`is_secret_name`), every header value (a mapping
    under ``headers``), and the credentials in any string that is a URL
    (:func:`redact_url`). Never raises; the caller's value is not changed.
    """
    return _redact(value, secret=False, depth=0)


def _redact(value: Any, *, secret: bool, depth: int) -> Any:
    if depth > 64:  # a config is not that deep: a cycle, or data that is not a config
        return MASK if secret else "..."
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if secret:
            return MASK
        return redact_url(value) if "://" in value else value
    if isinstance(value, int | float):
        return MASK if secret else value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = str(key)
            hide = secret or is_secret_name(name) or (name.lower() == "headers")
            out[name] = _redact(item, secret=hide, depth=depth + 1)
        return out
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else value
        return [_redact(item, secret=secret, depth=depth + 1) for item in items]
    if isinstance(value, bytes | bytearray):
        return MASK if secret else f"<{len(value)} bytes>"
    return _redact(_plain(value), secret=secret, depth=depth + 1)


def _plain(value: Any) -> Any:
    """A value of no plain type as plain data: msgspec's view of it, else its text."""
    import msgspec

    try:
        return msgspec.to_builtins(value, str_keys=True, enc_hook=str)
    except Exception:  # any object: record its text rather than fail the run
        return str(value)
