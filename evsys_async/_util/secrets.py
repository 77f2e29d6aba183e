"""Keeping credentials out of logs, events, files and error messages.

Wherever a URL or a header set is recorded or quoted, it goes through here
first: :func:`redact_url` replaces the password in ``user:pw@host`` (or a
bare token in ``token@host``) and the values of credential-like query
parameters with ``***``; :func:`secrets_of` lists the strings that must never
be shown, and :func:`scrub` removes them from any text (a server's reply, a
third-party log record).
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

__all__ = ["MASK", "ScrubFilter", "redact_headers", "redact_url", "scrub", "secrets_of"]

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
