"""structlog configuration and the redaction that keeps personal data and secrets out of logs.

The gateway logs ids, counts and durations, never bodies or user data; the redaction processor
is the net under that rule, for a key someone adds by mistake.
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import re
import sys
import threading
import time
from typing import Any, TextIO

import msgspec
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "REDACTED",
    "BufferedLines",
    "JsonLine",
    "bind",
    "bound",
    "configure_logging",
    "log_request",
    "logged_id",
    "logged_param",
    "redact",
    "scrub",
    "scrub_exception",
    "start_request_log",
]

# The fields of the request being served (its id, account, event id, outcome...), merged into
# every line logged while serving it. One dict per request in one context variable: binding a
# field is a dict update, where structlog's contextvars set a variable per field and copy the
# whole context at every line.
_REQUEST_FIELDS: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "ctwa_gateway_request_fields", default=None
)


def start_request_log(**fields: Any) -> None:
    """Start the fields of a new request (in the request's own task)."""
    _REQUEST_FIELDS.set(dict(fields))


def bind(**fields: Any) -> None:
    """Add fields to the current request's lines (outside a request: structlog's contextvars)."""
    current = _REQUEST_FIELDS.get()
    if current is None:
        structlog.contextvars.bind_contextvars(**fields)
    else:
        current.update(fields)


def bound() -> dict[str, Any]:
    """The fields bound to the current request so far."""
    return dict(_REQUEST_FIELDS.get() or structlog.contextvars.get_contextvars())


def _merge_request_fields(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    current = _REQUEST_FIELDS.get()
    if current:
        for key, value in current.items():
            event_dict.setdefault(key, value)
    return event_dict


REDACTED = "[redacted]"
# Keys whose values are personal data or secrets, wherever they appear at the top of an event.
_SENSITIVE = frozenset(
    {
        "access_token",
        "api_key",
        "app_secret",
        "authorization",
        "body",
        "bsuid",
        "business_scoped_user_id",
        "businessscopeduserid",
        "email",
        "external_id",
        "externalid",
        "key",
        "phone",
        "phone_e164",
        "parent_bsuid",
        "phonee164",
        "secret",
        "token",
        "user_id",
        "username",
        "wa_id",
    }
)


def redact(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Replace the values of sensitive keys, at the top of the event and in nested mappings
    and lists."""
    _mask_client_ids(event_dict)
    for key, value in event_dict.items():
        sensitive = _VERDICTS.get(key)
        if sensitive is None:
            sensitive = _sensitive(key)
        if sensitive:
            event_dict[key] = REDACTED
        elif type(value) in _CONTAINERS and key not in _HASHED:
            event_dict[key] = _redacted(value, 6)
    return event_dict


def _mask_client_ids(event_dict: EventDict) -> None:
    for key in _CLIENT_IDS:
        value = event_dict.get(key)
        if type(value) is str:
            event_dict[key] = logged_id(value)
    for key in _CLIENT_ID_LISTS:
        values = event_dict.get(key)
        if isinstance(values, (list, tuple)):
            event_dict[key] = [logged_id(v) if type(v) is str else v for v in values]


# Top-level keys come from code, a handful of names: each one's verdict is worked out once.
_VERDICTS: dict[str, bool] = {}


def _sensitive(key: str) -> bool:
    verdict = key.lower() in _SENSITIVE
    if len(_VERDICTS) < 10_000:
        _VERDICTS[key] = verdict
    return verdict


_CONTAINERS = frozenset({dict, list, tuple})


# The Meta request body the log sink prints: hashed by construction (an event with an
# unhashed em, ph or external_id never leaves the normalizers), and walking it on every
# event cost 4% of ingest throughput.
_HASHED = frozenset({"payload"})


def _redacted(value: Any, depth: int) -> Any:
    if depth == 0:
        return value
    if isinstance(value, dict):
        return {
            k: REDACTED
            if isinstance(k, str) and k.lower() in _SENSITIVE
            else _redacted(v, depth - 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redacted(v, depth - 1) for v in value]
    return value


# What personal data and secrets look like inside free text (an exception's message, which a
# plugin may have built from a request): emails, phone-like digit runs, bearer tokens.
_EMAIL = re.compile(r"[^\s@'\"<>(),;:]+@[^\s@'\"<>(),;:]+\.[A-Za-z]{2,}")
_DIGITS = re.compile(r"\+?\d[\d ().-]{6,}\d")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")
# A Meta access token (user, system-user and page tokens start EAA), quoted in an error.
_META_TOKEN = re.compile(r"\bEAA[A-Za-z0-9]{20,}")


def scrub(text: str) -> str:
    """Return ``text`` with emails, phone-like numbers, bearer tokens and Meta access tokens
    masked."""
    text = _EMAIL.sub("[email]", text)
    text = _BEARER.sub(r"\1[redacted]", text)
    text = _META_TOKEN.sub("[redacted]", text)
    return _DIGITS.sub("[number]", text)


def logged_param(param: str | None) -> str | None:
    """A request field path as a log line may hold it: the client chose it (an unknown key can
    be anything, an email included), so its personal data is masked and it is bounded.

    Masked before it is cut, so an email straddling the cut is still whole to the pattern;
    from a bounded slice, long enough for any email starting within the kept part, since the
    patterns' cost grows with the text.
    """
    return None if param is None else scrub(param[:_PARAM_SCANNED])[:_PARAM_LOGGED]


_PARAM_LOGGED = 100
# An email is at most 320 characters.
_PARAM_SCANNED = _PARAM_LOGGED + 400


def logged_id(value: str) -> str:
    """An id the client chose (an ``eventId``, an ``X-Request-Id``, an unknown ``accountId``)
    as a log line holds it: as sent, which is how an operator finds a request by it, unless
    it could hold personal data.

    - one holding an ``@`` is ``[email]``;
    - one that is nothing but a number of 8 to 15 digits (a phone number's shape: ``+``,
      separators, and blanks or punctuation around it allowed) is ``[number]``;
    - in any other, a BSUID (``US.13491208655302741918``) becomes ``[bsuid]``, and a number
      written the way only phone numbers are (after a ``+``, or ``tel:``, ``wa_``...) becomes
      ``[number]``, the rest kept (``lead-[number]``).

    Other numbers inside an id are kept (``order-12345678``, ``1733212345-abc``, a UUID):
    masking every digit run would hide most ids from the operator looking for them.
    """
    if "@" in value:
        return "[email]"
    # Blanks and punctuation around a number do not make it something else.
    bare = value.strip(_AROUND)
    if bare[:1] in _NUMBER_STARTS and _PHONE_SHAPED.fullmatch(bare):
        return "[number]"
    if "." in value:
        value = _BSUID_IN.sub("[bsuid]", value)
    if "+" in value or "tel" in value or "wa" in value or "sms" in value or "phone" in value:
        value = _PHONE_WRITTEN.sub("[number]", value)
    return value


# What a phone number written on its own looks like: E.164 has at most 15 digits.
_PHONE_SHAPED = re.compile(r"\+?\(?\d(?:[ ().-]{0,2}\d){7,14}")
_NUMBER_STARTS = frozenset("+(0123456789")
_AROUND = " \t\n\r\f\v.,;:!?'\"-_/|*#~^`<>[]{}="
# A number written as only phone numbers are, anywhere in an id: after a + that follows no
# letter or digit, or after a tel/wa/whatsapp/sms/phone label.
_PHONE_WRITTEN = re.compile(
    r"(?i)(?:(?<![A-Za-z0-9])\+|(?<![A-Za-z])(?:tel|wa|whatsapp|sms|phone)[:_-]\+?)"
    r"\(?\d(?:[ ().-]{0,2}\d){7,14}"
)
# A business-scoped user id anywhere in an id: two capitals (a country), a dot, then at
# least 15 digits and letters (Meta's are about 20; "SO.1234567", an order number, is not
# one), a parent's with ENT (META.md 3b).
_BSUID_IN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\.(?:ENT\.)?[A-Za-z0-9]{15,128}(?![A-Za-z0-9])")
# Keys whose values are ids a client chose (or lists of them): each line passes them through
# logged_id. (A request id needs none: the middleware adopts only one logged_id leaves as it
# is.)
_CLIENT_IDS = ("event_id",)
_CLIENT_ID_LISTS = ("event_ids",)


def scrub_exception(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Mask personal data in rendered exceptions' messages (after ExceptionRenderer), those
    of an exception group's members included."""
    if "exception" not in event_dict:
        return event_dict
    exception = event_dict["exception"]
    if isinstance(exception, list):
        _scrub_frames(exception, 8)
    elif isinstance(exception, str):
        event_dict["exception"] = scrub(exception)
    return event_dict


def _scrub_frames(frames: list[Any], depth: int) -> None:
    for frame in frames:
        if not isinstance(frame, dict):
            continue
        if isinstance(frame.get("exc_value"), str):
            frame["exc_value"] = scrub(frame["exc_value"])
        if isinstance(frame.get("exc_notes"), list):
            frame["exc_notes"] = [scrub(str(note)) for note in frame["exc_notes"]]
        members = frame.get("exceptions")
        if isinstance(members, list) and depth:
            for member in members:
                if isinstance(member, list):
                    _scrub_frames(member, depth - 1)


# msgspec renders an event several times faster than json.dumps; unknown types become str.
_json = msgspec.json.Encoder(enc_hook=str)


def _render_json(_: WrappedLogger, __: str, event_dict: EventDict) -> str:
    return _json.encode(event_dict).decode()


class _Timestamp:
    """structlog's ISO 8601 UTC stamp (``2026-11-25T18:07:08.123456Z``), with the part up to
    the second formatted once a second rather than on every line."""

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")

    def __call__(self, _: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        event_dict["timestamp"] = self.now()
        return event_dict

    def now(self) -> str:
        """The stamp of this moment."""
        second, micro = divmod(time.time_ns() // 1000, 1_000_000)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (
                second,
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)),
            )
        return "%s.%06dZ" % (cached[1], micro)  # noqa: UP031  (twice as fast as an f-string)


class JsonLine:
    """A JSON line in one call: the request's fields and structlog's contextvars merged in,
    the level, the timestamp, redaction, the exception (rendered without frame locals, its
    messages scrubbed), then msgspec's encoding.

    The same steps as the console's chain of processors, fused: a line logged while serving a
    request (at least the canonical one) paid a Python call per step.
    """

    def __init__(self) -> None:
        self._timestamp = _Timestamp()
        # show_locals=False: frame locals would put request bodies and secrets in the log.
        self._exceptions = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
        current = _REQUEST_FIELDS.get()
        if current:
            for key, value in current.items():
                event_dict.setdefault(key, value)
        if _structlog_contextvars_used():
            structlog.contextvars.merge_contextvars(logger, method_name, event_dict)
        event_dict["level"] = _LEVELS.get(method_name, method_name)
        self._timestamp(logger, method_name, event_dict)
        if "exc_info" in event_dict or "exception" in event_dict:
            # Rendered before redaction, which would turn an exc_info tuple into a list.
            self._exceptions(logger, method_name, event_dict)
            scrub_exception(logger, method_name, event_dict)
        redact(logger, method_name, event_dict)
        return _json.encode(event_dict).decode()

    def request_line(self, fields: dict[str, Any]) -> str:
        """The canonical line of a request (event ``request``, at info) with ``fields``.

        Its usual keys are ones the gateway binds with plain values (ids, names, codes,
        flags): a line holding only those, with no container among its values, has nothing
        for redaction to replace, and skips its walk. Any other line takes the whole path.
        """
        line = {"event": "request", **fields}
        current = _REQUEST_FIELDS.get()
        if current:
            # The request's fields after the line's own, which win (as setdefault would).
            line = {**line, **current, **line}
        if (
            not line.keys() <= _PLAIN_KEYS
            or not _CONTAINERS.isdisjoint(map(type, line.values()))
            or _structlog_contextvars_used()
        ):
            return self(None, "info", line)
        # Of the client's ids, only an eventId can be among the plain keys.
        event_id = line.get("event_id")
        if type(event_id) is str:
            line["event_id"] = logged_id(event_id)
        line["level"] = "info"
        line["timestamp"] = self._timestamp.now()
        return _json.encode(line).decode()


# What the gateway itself puts on a request's canonical line; none is personal data or a
# secret (an API key's name, bound as ``key_name``, is a label from the config).
_PLAIN_KEYS = frozenset(
    {
        "event",
        "method",
        "route",
        "status",
        "duration_ms",
        "request_id",
        "event_id",
        "account",
        "event_status",
        "duplicate",
        "error_code",
        "error_param",
        "notification_id",
        "key_name",
    }
)


# structlog's add_log_level names these two differently from the method.
_LEVELS = {"warn": "warning", "exception": "error"}


def log_request(**fields: Any) -> None:
    """Write the canonical line of a request (event ``request``, at info).

    When the fused JSON processor is what is configured, it renders the line directly:
    structlog's per-call machinery (the lazy proxy, the bound logger, the event dict's
    copies) was two fifths of the line's cost, paid by every request. Otherwise (console
    output, another configuration) the line goes through structlog like any other.
    """
    config = structlog.get_config()
    processors = config["processors"]
    if (
        len(processors) == 1
        and isinstance(processors[0], JsonLine)
        and config["wrapper_class"].is_enabled_for(None, logging.INFO)
    ):
        config["logger_factory"]().info(processors[0].request_line(fields))
    else:
        structlog.get_logger().info("request", **fields)


def _structlog_contextvars_used() -> bool:
    """Whether anything ever bound a structlog contextvar in this process: merging them copies
    the whole context, which a server that never binds them pays on every line for nothing.
    (structlog keeps the variables it made in ``_CONTEXT_VARS``; without it, always merge.)"""
    made = getattr(structlog.contextvars, "_CONTEXT_VARS", None)
    return made is None or bool(made)


class _LibraryLogs(logging.Handler):
    """aiohttp's own log records (a request it could not parse, a peer that vanished) as one
    structured line each, without the message's arguments or the traceback: aiohttp's
    traceback of a malformed request quotes its header lines, API keys included."""

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        structlog.get_logger().warning(
            "library_error", logger=record.name, message=str(record.msg)[:200], error_type=error
        )


def _route_library_logs() -> None:
    library = logging.getLogger("aiohttp")
    library.handlers = [_LibraryLogs()]
    library.propagate = False
    library.setLevel(logging.WARNING)


class BufferedLines:
    """A structlog logger that writes lines through a buffer, for a busy server.

    Lines at info and below leave within ``interval_s`` (a flusher thread writes whatever has
    gathered); a warning or an error flushes at once, with everything before it, so problems
    are never late and lines never reorder. A write per line cost a request a system call and,
    worse, handed the GIL to whichever thread was waiting for it. What is still buffered is
    written at exit; a killed process loses at most ``interval_s`` of info lines.
    """

    def __init__(self, stream: TextIO, interval_s: float = 0.1) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._interval_s = interval_s
        self._stopped = threading.Event()
        threading.Thread(target=self._flush_every, name="ctwa-gateway-logs", daemon=True).start()
        atexit.register(self.close)

    def info(self, message: str) -> None:
        self._lines.append(message)  # a list append is atomic; the flusher swaps the list

    debug = msg = log = info

    def warning(self, message: str) -> None:
        self._lines.append(message)
        self.flush()

    warn = error = err = exception = critical = fatal = failure = warning

    def flush(self) -> None:
        """Write every line gathered so far."""
        with self._lock:
            lines, self._lines = self._lines, []
            if lines:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()

    def close(self) -> None:
        """Stop the flusher and write what is left."""
        self._stopped.set()
        self.flush()

    def _flush_every(self) -> None:
        while not self._stopped.wait(self._interval_s):
            if self._lines:
                self.flush()


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    *,
    cache: bool = True,
    buffered: bool = False,
) -> None:
    """Configure structlog once for the process: JSON when not on a TTY, console on one.

    ``cache=False`` lets a later call reconfigure loggers already used (tests capture logs
    that way); a server keeps the default, which saves a bind per log call. ``buffered``: the
    server's JSON lines go through :class:`BufferedLines`.
    """
    out = stream if stream is not None else sys.stderr
    json = fmt == "json" or (fmt == "auto" and not out.isatty())
    processors: list[Processor]
    if json:
        # One processor for every step: each structlog processor is a call per line, and
        # the canonical request line runs this once per request.
        processors = [JsonLine()]
    else:
        processors = [
            _merge_request_fields,
            # What plugins bind with structlog's own contextvars.
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _Timestamp(),
            # The traceback as text first (before redaction turns an exc_info tuple into a
            # list), so its messages are scrubbed too (no locals).
            structlog.processors.format_exc_info,
            scrub_exception,
            redact,
            structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback),
        ]
    _route_library_logs()
    factory: Any = structlog.PrintLoggerFactory(out)
    if buffered and json:
        lines = BufferedLines(out)
        factory = lambda *_: lines  # noqa: E731  (one logger for the process)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=factory,
        cache_logger_on_first_use=cache,
    )
