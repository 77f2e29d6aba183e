"""HttpEvaluator: metrics from a remote eval server over HTTP (extra ``http``).

At each due step it POSTs a JSON body to ``url``::

    {"step": 9, "run_key": "demo", ...whatever payload(state, step_idx) returns}

(``step`` is 0-based; ``step`` and ``run_key`` win over payload keys of the same
name) and takes the metrics from the JSON reply: a flat mapping of numbers,
``{"acc": 0.91, "loss": 0.3}``, or ``{"metrics": {"acc": 0.91}, ...}`` (other
top-level keys are then ignored).

What fails, and how. Each failure raises :class:`HttpEvalError` with a
one-line reason, which the loop turns into a WARNING and an ``EvalFailed``
event; training goes on:

- connection refused, reset or dropped, or a 5xx reply: retried up to
  ``retries`` times, waiting ``backoff`` seconds before the first retry and
  twice as long before each next one (at most 5 s);
- no reply within ``timeout`` seconds: not retried (more load does not help a
  slow server; the next due step asks again);
- any other non-2xx reply (a 4xx, a redirect): not retried; the reason quotes
  the start of the reply's body;
- a reply larger than ``max_reply_bytes`` (default 1 MiB): refused while it
  streams in (an announced ``Content-Length`` past the limit before any of it
  is read), never held whole; not retried;
- a reply that is not JSON, nests deeper than 128 levels (checked before it is
  decoded: never a ``RecursionError``), or is not a mapping of metric names to
  numbers.

Every reason names the URL (``POST http://...``) and, for a limit, the limit.

One ``httpx.AsyncClient`` per evaluator (at most ``max_concurrency`` requests
at a time), opened in :meth:`HttpEvaluator.setup` and closed in
:meth:`HttpEvaluator.aclose`, which the loop calls at run start and in its
shutdown; it works on asyncio and trio. Outside a loop use ``async with
evaluator:``.

Secrets: header values and the URL's credentials (``user:pw@``, ``?token=``)
never appear in the evaluator's repr, its errors, the events or the logs
(httpx's own request log included): they read ``***``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio
import msgspec

from .._util.jsonl import MAX_DEPTH, too_deep
from .._util.log import get_logger
from .._util.secrets import ScrubFilter, redact_headers, redact_url, scrub, secrets_of
from ..errors import EvsysError, import_extra
from ..state import LoopState
from .base import register_evaluator

if TYPE_CHECKING:
    import httpx

__all__ = ["HttpEvalError", "HttpEvaluator"]

_log = get_logger()

#: the longest wait between two attempts, whatever ``backoff`` doubles to
_MAX_BACKOFF = 5.0
#: how much of a reply's body an error quotes
_PREVIEW = 80
#: the default bound on a reply's body, in bytes (a reply of metrics is a few hundred)
MAX_REPLY_BYTES = 1 << 20

Payload = Callable[[LoopState, int], Mapping[str, Any] | Awaitable[Mapping[str, Any]]]


class HttpEvalError(EvsysError, RuntimeError):
    """The eval server could not be reached, failed, timed out, or replied with
    something that is not metrics. The message is one line, credentials redacted."""


@register_evaluator("http")
class HttpEvaluator:
    """Metrics from an eval server: ``POST url`` at each due step, the JSON reply back.

    ``run_every`` is required (after step k when ``(k + 1) % run_every == 0``; 0
    never). ``timeout`` bounds each attempt, from connecting to the reply's last
    byte, in seconds; ``retries`` is how many times a connection error or a 5xx is
    tried again, ``backoff`` seconds apart at first, doubling; ``payload(state,
    step_idx)`` (``def`` or ``async def``) adds to the JSON body; ``headers``
    go with every request (an ``Authorization`` token, say) and are never
    shown. ``max_reply_bytes`` bounds a reply's (decoded) body: past it the
    reply is dropped as it streams in and the eval fails. Needs the extra
    ``http`` (httpx), checked here.

    Raises ``ValueError`` for a bad argument, :class:`MissingExtraError`
    without httpx. :meth:`evaluate` raises :class:`HttpEvalError`.
    """

    class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        """What a config may set (``payload`` is code, so only the API takes it)."""

        url: str
        run_every: int
        name: str = "remote"
        timeout: float = 10.0
        retries: int = 3
        max_concurrency: int = 1
        headers: dict[str, str] | None = None
        backoff: float = 0.5
        max_reply_bytes: int = MAX_REPLY_BYTES

    def __init__(
        self,
        url: str,
        *,
        name: str = "remote",
        run_every: int,
        timeout: float = 10.0,
        retries: int = 3,
        max_concurrency: int = 1,
        payload: Payload | None = None,
        headers: Mapping[str, str] | None = None,
        backoff: float = 0.5,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ) -> None:
        safe = redact_url(url) if isinstance(url, str) else repr(url)
        if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
            raise ValueError(
                f"HttpEvaluator: url must be an http:// or https:// URL, got {safe!r}; "
                "e.g. 'http://127.0.0.1:8000/eval'"
            )
        checks = (
            ("run_every", run_every, run_every >= 0, ">= 0 (0 = never)"),
            ("timeout", timeout, timeout > 0, "> 0 seconds"),
            ("retries", retries, retries >= 0, ">= 0"),
            ("max_concurrency", max_concurrency, max_concurrency >= 1, ">= 1"),
            ("backoff", backoff, backoff >= 0, ">= 0 seconds"),
            ("max_reply_bytes", max_reply_bytes, max_reply_bytes >= 1, ">= 1 (bytes)"),
        )
        for arg, value, ok, expected in checks:
            if not ok:
                raise ValueError(f"HttpEvaluator: {arg} must be {expected}, got {value!r}")
        if payload is not None and not callable(payload):
            raise ValueError(
                f"HttpEvaluator: payload must be a callable (state, step_idx) -> mapping, "
                f"got {type(payload).__name__}"
            )
        self._httpx: ModuleType = import_extra("httpx", "http", "HttpEvaluator")
        self.url = url
        self.name = name
        self.run_every = run_every
        self.timeout = timeout
        self.retries = retries
        self.max_concurrency = max_concurrency
        self.payload = payload
        self.headers = dict(headers or {})
        self.backoff = backoff
        self.max_reply_bytes = max_reply_bytes
        #: the URL as errors and logs show it: credentials read ``***``
        self.safe_url = redact_url(url)
        self._secrets = secrets_of(url=url, headers=self.headers)
        self._client: httpx.AsyncClient | None = None
        self._limiter: anyio.Semaphore | None = None
        self._log_filter: ScrubFilter | None = None
        self._users = 0  # runs that opened it and have not closed it yet

    def __repr__(self) -> str:
        headers = f", headers={redact_headers(self.headers)}" if self.headers else ""
        return (
            f"HttpEvaluator({self.safe_url!r}, name={self.name!r}, "
            f"run_every={self.run_every}, timeout={self.timeout}, retries={self.retries}"
            f"{headers})"
        )

    # -- lifecycle ---------------------------------------------------------------

    async def setup(self, state: LoopState | None = None) -> None:
        """Open the HTTP client (once, however many runs share this evaluator)."""
        if self._client is None:
            hx = self._httpx
            limits = hx.Limits(
                max_connections=self.max_concurrency,
                max_keepalive_connections=self.max_concurrency,
            )
            self._client = hx.AsyncClient(timeout=self.timeout, limits=limits, headers=self.headers)
            self._limiter = anyio.Semaphore(self.max_concurrency)
            # httpx logs each request's URL at INFO: keep this evaluator's secrets out
            self._log_filter = ScrubFilter(self._secrets)
            httpx_logger = _httpx_logger()
            httpx_logger.addFilter(self._log_filter)
        self._users += 1

    async def aclose(self) -> None:
        """Close the client once the last run using it ends. Safe to call when
        nothing is open; the client is released even if closing it is cut short."""
        self._users = max(0, self._users - 1)
        if self._users or self._client is None:
            return
        client, self._client, self._limiter = self._client, None, None
        try:
            await client.aclose()
        finally:
            if self._log_filter is not None:
                _httpx_logger().removeFilter(self._log_filter)
                self._log_filter = None

    async def __aenter__(self) -> Self:
        await self.setup()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- evaluate ----------------------------------------------------------------

    async def evaluate(self, state: LoopState, step_idx: int) -> dict[str, float]:
        """POST the step (and payload); return the reply's metrics as floats.

        Raises :class:`HttpEvalError` (see the module docstring for which failures
        are retried). Cancellation-safe: a cancelled request is abandoned and its
        connection released.
        """
        client, limiter = self._client, self._limiter
        if client is None or limiter is None:
            raise HttpEvalError(
                f"{self._where}: no open HTTP client; the loop opens it at run start "
                "(setup failed, or evaluate ran outside a run: use `async with evaluator:`)"
            )
        body = await self._body(state, step_idx)
        async with limiter:
            response, content = await self._post(client, body)
        return self._metrics(response, content)

    @property
    def _where(self) -> str:
        return f"POST {self.safe_url}"

    async def _body(self, state: LoopState, step_idx: int) -> bytes:
        fields: dict[str, Any] = {}
        if self.payload is not None:
            extra: Any = self.payload(state, step_idx)
            if inspect.isawaitable(extra):
                extra = await extra
            if not isinstance(extra, Mapping):
                raise HttpEvalError(
                    f"{self._where}: payload(state, step_idx) must return a mapping, "
                    f"got {type(extra).__name__}"
                )
            fields.update(extra)
        fields["step"] = step_idx
        fields["run_key"] = state.ctx.run_key
        try:
            return msgspec.json.encode(fields)
        except (TypeError, msgspec.EncodeError) as exc:
            raise HttpEvalError(
                f"{self._where}: payload is not JSON-serialisable ({exc}); "
                "return numbers, strings, lists and dicts"
            ) from None

    async def _post(self, client: httpx.AsyncClient, body: bytes) -> tuple[httpx.Response, bytes]:
        hx = self._httpx
        attempts = self.retries + 1
        delay = self.backoff
        reason = ""
        for attempt in range(1, attempts + 1):
            try:
                with anyio.fail_after(self.timeout):  # the whole attempt, not each phase
                    async with client.stream(
                        "POST",
                        self.url,
                        content=body,
                        headers={"content-type": "application/json"},
                    ) as response:
                        ok = 200 <= response.status_code < 300
                        # an error reply is only quoted: its first bytes are enough
                        content = await self._read(response, whole=ok)
            except hx.ConnectTimeout:
                reason = f"could not connect within {self.timeout}s"
            except (hx.TimeoutException, TimeoutError):
                raise HttpEvalError(
                    f"{self._where}: no reply within {self.timeout}s (timeout); not retried"
                ) from None
            except (hx.NetworkError, hx.RemoteProtocolError) as exc:
                reason = f"connection failed ({self._clean(f'{type(exc).__name__}: {exc}')})"
            else:
                status = response.status_code
                if ok:
                    return response, content
                # HTTP/1.1 servers may omit the phrase (Hypercorn does): the standard one
                phrase = response.reason_phrase or hx.codes.get_reason_phrase(status)
                line = f"HTTP {status} {self._clean(phrase)}".rstrip()
                if status < 500:
                    text = content.decode(response.encoding or "utf-8", errors="replace")
                    raise HttpEvalError(
                        f"{self._where}: {line}, not retried: {self._preview(text)}"
                    )
                reason = line
            if attempt < attempts:
                _log.debug(
                    "eval request failed; retrying",
                    evaluator=self.name,
                    url=self.safe_url,
                    attempt=attempt,
                    reason=reason,
                    retry_in=delay,
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)
        tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
        raise HttpEvalError(f"{self._where}: {reason} after {tries}")

    async def _read(self, response: httpx.Response, *, whole: bool) -> bytes:
        """The reply's body, read as it streams in and bounded by ``max_reply_bytes``:
        past it, raise (``whole``) or stop reading (an error reply, only quoted)."""
        limit = self.max_reply_bytes if whole else min(self.max_reply_bytes, 4 * _PREVIEW)
        announced = response.headers.get("content-length", "")
        if whole and announced.isdigit() and int(announced) > limit:
            raise self._too_large(f"its Content-Length is {int(announced):,} bytes")
        chunks: list[bytes] = []
        size = 0
        over = False
        # Past the limit the connection is closed and the loop goes on until the read
        # fails: httpx's body is a chain of async generators, and leaving the loop
        # early would abandon the inner ones half-run (trio rightly warns when they
        # are collected); a failed read ends every one of them.
        try:
            async for chunk in response.aiter_bytes():
                if over:
                    continue  # what was buffered before the close: dropped
                size += len(chunk)
                chunks.append(chunk)
                if size > limit:
                    over = True
                    await response.aclose()
        except self._httpx.HTTPError:
            if not over:
                raise
        if over and whole:
            raise self._too_large(f"more than {limit:,} bytes arrived")
        return b"".join(chunks)

    def _too_large(self, seen: str) -> HttpEvalError:
        return HttpEvalError(
            f"{self._where}: reply larger than the limit of {self.max_reply_bytes:,} bytes "
            f"({seen}); dropped unread, not retried. A reply of metrics is a few hundred "
            "bytes: have the server send fewer, or raise max_reply_bytes"
        )

    def _metrics(self, response: httpx.Response, content: bytes) -> dict[str, float]:
        if too_deep(content):
            raise HttpEvalError(
                f"{self._where}: reply nests deeper than the limit of {MAX_DEPTH} levels of "
                'arrays and objects; not decoded. Reply with {"name": number, ...}'
            )
        try:
            data = msgspec.json.decode(content)
        except msgspec.DecodeError:
            kind = response.headers.get("content-type", "no content-type")
            text = content.decode(response.encoding or "utf-8", errors="replace")
            raise HttpEvalError(
                f"{self._where}: reply is not JSON ({kind}): {self._preview(text)}"
            ) from None
        inner = data.get("metrics") if isinstance(data, dict) else None
        metrics = inner if isinstance(inner, dict) else data
        hint = 'reply with {"name": number, ...} or {"metrics": {"name": number, ...}}'
        if not isinstance(metrics, dict):
            raise HttpEvalError(
                f"{self._where}: reply is a JSON {type(metrics).__name__}, not a mapping of "
                f"metric names to numbers; {hint}"
            )
        out: dict[str, float] = {}
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                shown = self._preview(msgspec.json.encode(value).decode())
                raise HttpEvalError(
                    f"{self._where}: reply's metric {self._clean(str(key))!r} is {shown}, "
                    f"not a number; {hint}"
                )
            out[str(key)] = float(value)
        return out

    def _clean(self, text: str) -> str:
        return scrub(" ".join(text.split()), self._secrets)

    def _preview(self, text: str) -> str:
        text = self._clean(text)
        if not text:
            return "(empty body)"
        return text if len(text) <= _PREVIEW else text[: _PREVIEW - 1] + "…"


def _httpx_logger() -> logging.Logger:
    return logging.getLogger("httpx")
