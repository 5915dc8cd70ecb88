"""Example plugin in Python: grants the points a completed task earns by calling
the team's rewards service, then announces the grant on `marketing.reward.granted`.

Same behaviour as plugins/reward-granter (Rust; its header shows the plugin's
entry) and plugins/js/reward-granter:

- Points: 10 per unit of `event_data.count` (default 1). A count that is not a
  non-negative integer will not become one on a retry: dead-letter.
- `POST <rewards_url>/grants` (config `rewards_url`, secret `rewards_token`,
  both through wasi:config/store) with the message id as `idempotency-key`.
- 201 or 200: publishes the grant with tag `REWARD_GRANTED`. 429 or 503: retry
  no sooner than the service's `retry-after` seconds (default 30 s). 400:
  dead-letter. Any other status, or no answer: retry.

HTTP goes through the stock wasi:http bindings, synchronously (Python's urllib
has no sockets in a component). Build: bash scripts/build-guest-plugins.sh.
"""

import json
import re

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import log, outgoing_handler, publish, store
from wit_world.imports.mqplug_plugin_types import (
    Delivery,
    HandlerError_DeadLetter,
    HandlerError_Retry,
    HandlerError_RetryAfter,
    RetryAfter,
    TaskEvent,
)
from wit_world.imports.streams import StreamError_Closed
from wit_world.imports.wasi_http_types import (
    Fields,
    IncomingBody,
    Method_Post,
    OutgoingBody,
    OutgoingRequest,
    Scheme_Http,
    Scheme_Https,
)

# Where the follow-up goes.
GRANTED_TOPIC = "marketing.reward.granted"
U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1
# Rust's `str::trim` (Unicode White_Space) and `parse::<u64>` (an optional `+`, digits).
WHITE_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006" \
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
U64_TEXT = re.compile(r"\+?[0-9]+")


class Retry(Exception):
    """A reason to retry on the broker's schedule (what the Rust version's `?` does)."""


def compact(value) -> str:
    """JSON text as serde_json writes it: no spaces, non-ASCII as is."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Float(float):
    """A JSON number with a fraction or an exponent, and its text: the host
    wrote the event data with serde_json, so the text is how the Rust version
    spells the number (1e-7 and 0.00001, where Python's repr says 1e-07
    and 1e-05)."""

    def __new__(cls, text: str):
        number = super().__new__(cls, text)
        number.text = text
        return number


class Handler(exports.Handler):
    def handle(self, event: TaskEvent, delivery: Delivery) -> None:
        try:
            grant(event, delivery)
        except Retry as why:
            raise Err(HandlerError_Retry(str(why)))


def config(key: str):
    """The value of `key`; None when the plugin's entry does not set it."""
    try:
        return store.get(key)
    except Err:
        # mqplug's store never fails; an error would mean no value either.
        return None


def grant(event: TaskEvent, delivery: Delivery) -> None:
    try:
        data = json.loads(event.event_data, parse_float=Float)
    except ValueError as err:
        raise Retry(f"event-data is not valid JSON: {err}")
    count = data.get("count", 1) if isinstance(data, dict) else 1
    # bool is an int in Python; JSON true is not a count. Nor is 2^64.
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= U64_MAX:
        text = count.text if isinstance(count, Float) else compact(count)
        raise Err(HandlerError_DeadLetter(
            f"event_data.count must be a non-negative integer, got {text}"
        ))
    points = min(count * 10, U64_MAX)
    url = config("rewards_url")
    if url is None:
        raise Retry("config rewards_url is not set")
    token = config("rewards_token")
    if token is None:
        raise Retry("secret rewards_token is not set")

    # serde_json's `json!` sorts keys: the same bytes as the Rust version.
    body = json.dumps(
        {"user_id": event.user_id, "points": points, "campaign_id": event.campaign_id},
        ensure_ascii=False, separators=(",", ":"), sort_keys=True,
    )
    try:
        status, headers, answer = post(
            url.rstrip("/") + "/grants",
            [
                ("content-type", "application/json"),
                ("authorization", f"Bearer {token}"),
                ("idempotency-key", delivery.message_id),
            ],
            body.encode(),
        )
    except Retry as why:
        raise Retry(f"rewards service: {why}")

    if status in (429, 503):
        seconds = 30
        value = header(headers, "retry-after")
        if value is not None:
            value = value.strip(WHITE_SPACE)
            if U64_TEXT.fullmatch(value) and int(value) <= U64_MAX:
                seconds = int(value)
        raise Err(HandlerError_RetryAfter(RetryAfter(
            reason=f"rewards service busy ({status})",
            delay_ms=min(seconds * 1000, U32_MAX),
        )))
    if status == 400:
        raise Err(HandlerError_DeadLetter(
            f"rewards service refused the grant: {answer.decode('utf-8', 'replace')}"
        ))
    if status not in (200, 201):
        raise Retry(f"rewards service answered {status}")
    try:
        granted = json.loads(answer)
    except ValueError as err:
        raise Retry(f"rewards service sent no JSON: {err}")
    grant_id = granted.get("grant_id") if isinstance(granted, dict) else None
    if not isinstance(grant_id, str):
        grant_id = ""
    announcement = json.dumps(
        {
            "grant_id": grant_id,
            "user_id": event.user_id,
            "points": points,
            "campaign_id": event.campaign_id,
            "message_id": delivery.message_id,
        },
        ensure_ascii=False, separators=(",", ":"), sort_keys=True,
    )
    try:
        publish.send(publish.Message(
            topic=GRANTED_TOPIC, tag="REWARD_GRANTED", keys=[grant_id] if grant_id else [],
            body=announcement.encode(),
        ))
    except Err as err:
        why = err.value
        if isinstance(why, publish.PublishError_TopicNotAllowed):
            raise Retry(f"topic {why.value} is not in this plugin's allowed_topics")
        if isinstance(why, publish.PublishError_TooLarge):
            raise Retry(f"message over {why.value} bytes")
        raise Retry(f"more than {why.value} messages for one event")
    again = ", already granted before" if status == 200 else ""
    log.log(
        log.Level.INFO,
        f"granted {points} points to user {event.user_id} in campaign {event.campaign_id} "
        f"(grant {grant_id}{again})",
    )


def header(headers, name: str):
    """The first header called `name` (any case), as text; None if absent or not UTF-8."""
    for key, value in headers:
        if key.lower() == name:
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                return None
    return None


def error_name(err) -> str:
    """A wasi:http error as Rust's Debug spells it, roughly: `HttpRequestDenied`."""
    name = type(err).__name__.split("_", 1)[-1]
    value = getattr(err, "value", None)
    return name if value is None else f"{name}({value!r})"


def post(url: str, headers, body: bytes):
    """Sends a POST through wasi:http/outgoing-handler and reads the whole
    response: (status, [(name, value bytes)], body bytes). Raises Retry naming
    what failed. http:// and https:// URLs, like the Rust SDK's `http::request`."""
    if url.startswith("http://"):
        scheme, rest = Scheme_Http(), url[len("http://"):]
    elif url.startswith("https://"):
        scheme, rest = Scheme_Https(), url[len("https://"):]
    else:
        raise Retry(f"{url}: only http:// and https:// URLs")
    at = rest.find("/")
    authority, path = (rest, "/") if at < 0 else (rest[:at], rest[at:])
    try:
        fields = Fields.from_list([(name, value.encode()) for name, value in headers])
    except Err as err:
        raise Retry(f"header: {error_name(err.value)}")
    # The request, the fields and the body are handed over (to the request,
    # `handle` and `finish`); the other resources are dropped by the `with`
    # blocks, children before their parents (the other way round traps).
    outgoing_request = OutgoingRequest(fields)
    for what, setter, value in (
        ("method", outgoing_request.set_method, Method_Post()),
        ("scheme", outgoing_request.set_scheme, scheme),
        ("authority", outgoing_request.set_authority, authority),
        ("path", outgoing_request.set_path_with_query, path),
    ):
        try:
            setter(value)
        except Err:
            raise Retry(f"{url}: invalid {what}")
    outgoing = outgoing_request.body()
    try:
        future = outgoing_handler.handle(outgoing_request, None)
    except Err as err:
        raise Retry(error_name(err.value))
    with future:
        # A body that cannot be written is usually the request failing (a
        # refused origin, a closed connection): the response's error says
        # why, the same way every time, so it is reported first.
        write_error = None
        with outgoing.write() as stream:
            for start in range(0, len(body), 4096):
                try:
                    stream.blocking_write_and_flush(body[start:start + 4096])
                except Err as err:
                    write_error = f"writing the request body: {error_name(err.value)}"
                    break
        if write_error is None:
            try:
                OutgoingBody.finish(outgoing, None)
            except Err as err:
                write_error = error_name(err.value)
        else:
            # Unfinished: the request's body ends in an error.
            outgoing.__exit__(None, None, None)
        with future.subscribe() as pollable:
            pollable.block()
        answer = future.get()
        if answer is None:
            raise Retry("no response")
        if isinstance(answer, Err):
            raise Retry("response taken")
        if isinstance(answer.value, Err):
            raise Retry(error_name(answer.value.value))
        if write_error is not None:
            raise Retry(write_error)
        with answer.value.value as response:
            status = response.status()
            with response.headers() as fields:
                headers = fields.entries()
            incoming = response.consume()
            chunks = []
            with incoming.stream() as stream:
                while True:
                    try:
                        chunks.append(stream.blocking_read(64 * 1024))
                    except Err as err:
                        if isinstance(err.value, StreamError_Closed):
                            break
                        with err.value.value as failure:
                            raise Retry(f"reading the response: {failure.to_debug_string()}")
            with IncomingBody.finish(incoming):
                pass
    return status, headers, b"".join(chunks)
