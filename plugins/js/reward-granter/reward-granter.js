// Example plugin in JavaScript: grants the points a completed task earns by
// calling the team's rewards service, then announces the grant on
// `marketing.reward.granted`.
//
// Same behaviour as plugins/reward-granter (Rust; its header shows the
// plugin's entry) and plugins/python/reward_granter:
//
// - Points: 10 per unit of `event_data.count` (default 1). A count that is
//   not a non-negative integer will not become one on a retry: dead-letter.
// - `POST <rewards_url>/grants` (config `rewards_url`, secret `rewards_token`,
//   both through wasi:config/store) with the message id as `idempotency-key`.
// - 201 or 200: publishes the grant with tag `REWARD_GRANTED`. 429 or 503:
//   retry no sooner than the service's `retry-after` seconds (default 30 s).
//   400: dead-letter. Any other status, or no answer: retry.
//
// HTTP goes through the stock wasi:http imports, synchronously, as in the
// Python version, not through `fetch`. `fetch` does work in componentize-js
// 0.23 (its `http` feature, with `handle` an async function: the export runs
// the event loop until the promise settles, and a rejection with a
// handler-error is the result's `err`), but StarlingMonkey traps
// (`unreachable`) when a request with a body fails before the body is
// written: a refused connection or an origin the entry does not grant makes
// the plugin trap instead of asking for a retry. So no `http` feature here;
// the component imports wasi:http, wasi:io and the monotonic clock, which
// the world's wasi:http needs anyway.
//
// Build: bash scripts/build-guest-plugins.sh (componentize-js, about 15 s).
// WIT names become camelCase; a u64 such as userId is a BigInt.

import { get } from 'wasi:config/store@0.2.0-rc.1';
import { handle } from 'wasi:http/outgoing-handler@0.2.12';
import { Fields, IncomingBody, OutgoingBody, OutgoingRequest } from 'wasi:http/types@0.2.12';
import { log } from 'mqplug:plugin/log@0.2.0';
import { send } from 'mqplug:plugin/publish@0.2.0';

// Where the follow-up goes.
const GRANTED_TOPIC = 'marketing.reward.granted';
const U64_MAX = 2n ** 64n - 1n;
const U32_MAX = 2 ** 32 - 1;
// A JSON number that serde_json reads as a u64 (what the Rust version accepts).
const U64_NUMBER = /^(0|[1-9][0-9]*)$/;
// Rust's `str::trim` (Unicode White_Space) and `parse::<u64>` (an optional `+`, digits).
const TRIM = /^[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+|[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+$/g;
const U64_TEXT = /^\+?[0-9]+$/;

const retry = (reason) => ({ tag: 'retry', val: reason });
const deadLetter = (reason) => ({ tag: 'dead-letter', val: reason });

// The value of `key`; undefined when the plugin's entry does not set it.
function config(key) {
  try {
    return get(key) ?? undefined;
  } catch {
    // mqplug's store never fails; an error would mean no value either.
    return undefined;
  }
}

// The count of the event data (1 when absent), as a BigInt, or the
// dead-letter error. The number's text decides, not its double: 1.0, -0 or
// 2^53 + 1 are judged as serde_json judges them (JSON.parse's source text).
function countOf(eventData) {
  let data;
  const sources = new Map();
  try {
    data = JSON.parse(eventData, function (key, value, context) {
      if (key === 'count' && context?.source !== undefined) sources.set(this, context.source);
      return value;
    });
  } catch (err) {
    throw retry(`event-data is not valid JSON: ${err.message}`);
  }
  if (data === null || typeof data !== 'object' || Array.isArray(data) || !Object.hasOwn(data, 'count')) {
    return 1n;
  }
  const value = data.count;
  const text = typeof value === 'number' ? sources.get(data) : JSON.stringify(value);
  if (typeof value === 'number' && U64_NUMBER.test(text) && BigInt(text) <= U64_MAX) {
    return BigInt(text);
  }
  throw deadLetter(`event_data.count must be a non-negative integer, got ${text}`);
}

export const handler = {
  handle(event, delivery) {
    const count = countOf(event.eventData);
    const points = count * 10n > U64_MAX ? U64_MAX : count * 10n;
    const url = config('rewards_url');
    if (url === undefined) throw retry('config rewards_url is not set');
    const token = config('rewards_token');
    if (token === undefined) throw retry('secret rewards_token is not set');

    // JSON.stringify cannot write a BigInt; serde_json's `json!` sorts keys:
    // the same bytes as the Rust version.
    const body =
      `{"campaign_id":${JSON.stringify(event.campaignId)},"points":${points},` +
      `"user_id":${event.userId}}`;
    const { status, headers, answer } = post(
      `${url.replace(/\/+$/, '')}/grants`,
      [
        ['content-type', 'application/json'],
        ['authorization', `Bearer ${token}`],
        ['idempotency-key', delivery.messageId],
      ],
      new TextEncoder().encode(body),
    );

    if (status === 429 || status === 503) {
      let seconds = 30n;
      const value = header(headers, 'retry-after')?.replace(TRIM, '');
      if (value !== undefined && U64_TEXT.test(value) && BigInt(value) <= U64_MAX) {
        seconds = BigInt(value);
      }
      const delayMs = seconds * 1000n > BigInt(U32_MAX) ? U32_MAX : Number(seconds * 1000n);
      throw { tag: 'retry-after', val: { reason: `rewards service busy (${status})`, delayMs } };
    }
    if (status === 400) {
      const text = new TextDecoder('utf-8', { ignoreBOM: true }).decode(answer);
      throw deadLetter(`rewards service refused the grant: ${text}`);
    }
    if (status !== 200 && status !== 201) throw retry(`rewards service answered ${status}`);
    let granted;
    try {
      granted = JSON.parse(new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(answer));
    } catch (err) {
      throw retry(`rewards service sent no JSON: ${err.message}`);
    }
    const grantId =
      granted !== null && typeof granted === 'object' && typeof granted.grant_id === 'string'
        ? granted.grant_id
        : '';
    const announcement =
      `{"campaign_id":${JSON.stringify(event.campaignId)},"grant_id":${JSON.stringify(grantId)},` +
      `"message_id":${JSON.stringify(delivery.messageId)},"points":${points},"user_id":${event.userId}}`;
    try {
      send({
        topic: GRANTED_TOPIC,
        tag: 'REWARD_GRANTED',
        keys: grantId === '' ? [] : [grantId],
        body: new TextEncoder().encode(announcement),
      });
    } catch (err) {
      throw retry(publishFailure(err.payload ?? err));
    }
    log(
      'info',
      `granted ${points} points to user ${event.userId} in campaign ${event.campaignId} ` +
        `(grant ${grantId}${status === 200 ? ', already granted before' : ''})`,
    );
  },
};

// Why `send` refused, as the Rust SDK words it.
function publishFailure(error) {
  switch (error?.tag) {
    case 'topic-not-allowed':
      return `topic ${error.val} is not in this plugin's allowed_topics`;
    case 'too-large':
      return `message over ${error.val} bytes`;
    case 'too-many':
      return `more than ${error.val} messages for one event`;
    default:
      return `publish failed: ${error}`;
  }
}

// The first header called `name` (lower case) as text; undefined if absent or not UTF-8.
function header(headers, name) {
  const found = headers.find(([key]) => key.toLowerCase() === name);
  if (found === undefined) return undefined;
  try {
    return new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(found[1]);
  } catch {
    return undefined;
  }
}

// A wasi:http or wasi:io error case as Rust's Debug names it, roughly:
// `HTTP-request-denied` becomes `HttpRequestDenied`.
function errorName(error) {
  const value = error?.payload ?? error;
  if (typeof value?.tag !== 'string') return String(value);
  const name = value.tag
    .split('-')
    .map((part) => part[0].toUpperCase() + part.slice(1).toLowerCase())
    .join('');
  return value.val === undefined ? name : `${name}(${JSON.stringify(value.val)})`;
}

// Sends a POST through wasi:http/outgoing-handler and reads the whole
// response: { status, headers: [[name, bytes]], answer: bytes }. A failure is
// the retry error naming it. http:// and https:// URLs, like the Rust SDK's
// `http::request`. Resources are dropped explicitly ([Symbol.dispose]),
// children before their parents: the garbage collector could drop a parent
// first, which traps. The ones handed over (fields, the request, the
// bodies) are not.
function post(url, headerList, body) {
  const fail = (why) => retry(`rewards service: ${why}`);
  const secure = url.startsWith('https://');
  if (!secure && !url.startsWith('http://')) throw fail(`${url}: only http:// and https:// URLs`);
  const rest = url.slice(secure ? 'https://'.length : 'http://'.length);
  const at = rest.indexOf('/');
  const [authority, path] = at < 0 ? [rest, '/'] : [rest.slice(0, at), rest.slice(at)];
  let fields;
  try {
    fields = Fields.fromList(headerList.map(([name, value]) => [name, new TextEncoder().encode(value)]));
  } catch (err) {
    throw fail(`header: ${errorName(err)}`);
  }
  const request = new OutgoingRequest(fields);
  for (const [what, set, value] of [
    ['method', 'setMethod', { tag: 'post' }],
    ['scheme', 'setScheme', { tag: secure ? 'HTTPS' : 'HTTP' }],
    ['authority', 'setAuthority', authority],
    ['path', 'setPathWithQuery', path],
  ]) {
    try {
      request[set](value);
    } catch {
      throw fail(`${url}: invalid ${what}`);
    }
  }
  const outgoing = request.body();
  let future;
  try {
    future = handle(request, undefined);
  } catch (err) {
    throw fail(errorName(err));
  }
  try {
    // A body that cannot be written is usually the request failing (a
    // refused origin, a closed connection): the response's error says why,
    // the same way every time, so it is reported first.
    let writeError;
    const stream = outgoing.write();
    try {
      for (let start = 0; start < body.length; start += 4096) {
        stream.blockingWriteAndFlush(body.subarray(start, start + 4096));
      }
    } catch (err) {
      writeError = `writing the request body: ${errorName(err)}`;
    } finally {
      stream[Symbol.dispose]();
    }
    if (writeError === undefined) {
      try {
        OutgoingBody.finish(outgoing, undefined);
      } catch (err) {
        writeError = errorName(err);
      }
    } else {
      // Unfinished: the request's body ends in an error.
      outgoing[Symbol.dispose]();
    }
    const pollable = future.subscribe();
    pollable.block();
    pollable[Symbol.dispose]();
    const answer = future.get();
    if (answer === undefined) throw fail('no response');
    if (answer.tag === 'err') throw fail('response taken');
    if (answer.val.tag === 'err') throw fail(errorName(answer.val.val));
    if (writeError !== undefined) throw fail(writeError);
    const response = answer.val.val;
    try {
      const status = response.status();
      const fields = response.headers();
      const headers = fields.entries();
      fields[Symbol.dispose]();
      const incoming = response.consume();
      const chunks = [];
      const input = incoming.stream();
      try {
        for (;;) {
          chunks.push(input.blockingRead(64n * 1024n));
        }
      } catch (err) {
        const why = err?.payload ?? err;
        if (why?.tag !== 'closed') {
          let detail = errorName(why);
          if (why?.tag === 'last-operation-failed') {
            detail = why.val.toDebugString();
            why.val[Symbol.dispose]();
          }
          throw fail(`reading the response: ${detail}`);
        }
      } finally {
        input[Symbol.dispose]();
      }
      IncomingBody.finish(incoming)[Symbol.dispose]();
      const answer = new Uint8Array(chunks.reduce((length, chunk) => length + chunk.length, 0));
      let offset = 0;
      for (const chunk of chunks) {
        answer.set(chunk, offset);
        offset += chunk.length;
      }
      return { status, headers, answer };
    } finally {
      response[Symbol.dispose]();
    }
  } finally {
    future[Symbol.dispose]();
  }
}
