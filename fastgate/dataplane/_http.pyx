# cython: language_level=3, embedsignature=True, wraparound=True, boundscheck=True
"""The compiled HTTP/1.1 data plane: the client protocol and the upstream relay (SPEC §1).

:class:`ClientProtocol` is the asyncio protocol of one client connection *and* the llhttp
parser's callback target (the shape of uvicorn's ``httptools_impl.py``). A request is decided
inside ``on_headers_complete``: route, header pass, auth (a cached verify is a plain call),
policy; an admitted request's head goes to a warm pooled upstream connection
(:class:`RelayConn`) in the same call, its body is relayed from ``on_body``, and the response
is relayed back from the upstream connection's own callbacks into :class:`Exchange`, the
per-request state. The common request -- admitted or rejected, cached or not, small body or
none -- creates no task, future or coroutine; only the slow cases do (waiting for keys,
opening an upstream connection). Compiled because the profile of the pure-Python version of
this module was all attribute lookups and calls (docs/benchmarks.md); the logic is the same.

HTTP/1.1 rules enforced here (each cited where it is applied; docs/security.md has the table):
one response per request, in order (pipelined requests queue behind the one in flight and
reading pauses, RFC 9112 §9.3.2); a rejected request whose body was not read closes the
connection; framing conflicts -> 400 + close (RFC 9112 §6.1, §6.3); origin-form targets only
(§3.2); exactly one valid Host (§3.2); ``Connection: close`` and HTTP/1.0 honoured (§9.3,
§9.6); the head limit is counted in bytes while they arrive; ``timeouts.header`` (408),
``timeouts.keepalive``, ``timeouts.send``.

Upstream framing safety (response-queue poisoning): a :class:`RelayConn` serves one exchange
at a time (the gateway never pipelines upstream). Any parser activity after the response's
framing ended -- a second response in the same read, a body after 204/304 or a HEAD response,
more bytes than Content-Length, bytes while idle -- marks it ``must_close``: it is closed,
never returned to the pool, and the bytes never reach a client.

Layout: this file holds the imports and cimports, the C-level rebindings, the constants and
enums, ``monotonic`` and ``_Stop``; the rest is included, in this order:

- ``_exchange.pxi``: ``RequestHeaders`` and :class:`Exchange` (one request and its response);
- ``_client.pxi``: :class:`ClientProtocol` (the client connection);
- ``_slow.pxi``: the slow paths (``_decide_later``, ``_ReplayWait``, ``_connect_then_send``);
- ``_relay.pxi``: :class:`RelayConn` (the upstream leg).

Includes, not modules: it stays ONE extension module, so the calls between these classes stay
direct C calls of ``cdef`` methods (no Python-level indirection, no cross-module cimport
through a capsule) and there is no ``.pxd`` of their attributes and methods to keep in step.
The order is the order the code had in one file, so the generated C is the same as the
unsplit module's; a cdef class may be named as a type before its definition (ClientProtocol
holds a RelayConn), as Cython declares every class of the module first.

``_client.pxi`` stays at about 980 lines, over the size the other files keep to: it is one
``cdef class`` and Cython allows no ``include`` inside a class body. Cutting it up would mean
turning its methods into module-level functions taking the connection, which changes the
generated C (and every ``self.`` call on the request path) for a layout change; and it is one
concern, the state of one client connection (parse, decide, send, relay back, time out).
"""

import asyncio
import base64
import collections
import hashlib
import hmac
import ipaddress
import logging
import os
import re
from ssl import SSLError

import httptools

from fastgate.dataplane._flow cimport HIGH_WATER, PEER_BUSY, PENDING, QUEUED, ReadGate
from fastgate.dataplane._routes cimport Route, RouteTable, path_is_ambiguous
from libc.time cimport time as c_time
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from fastgate.auth.extract import strip_query_param
from fastgate.httpfields import HOP_BY_HOP
from fastgate.dataplane.proxy import (
    A_AUTH, A_AUTH_DROP, A_CONNECTION, A_EXPECT, A_HOST, A_LENGTH, A_REQUEST_ID, A_TE,
    A_TRACEPARENT, A_TRACESTATE, A_UPGRADE, A_XFF, A_XFH, A_XFP,
)
from fastgate.token.reasons import Reason
from fastgate.auth.responses import (
    BAD_GATEWAY, BAD_REQUEST, GATEWAY_TIMEOUT, HEADERS_TOO_LARGE, METHOD_NOT_ALLOWED,
    NOT_FOUND, PAYLOAD_TOO_LARGE, REQUEST_TIMEOUT, SERVICE_UNAVAILABLE,
)
from fastgate.dataplane.upstream import UpstreamError, retire
from fastgate.token._verify import token_shape
from fastgate.auth.replay import FRESH, NONCE_UNKNOWN, REPLAYED
from fastgate.auth.replay import PENDING as STORE_PENDING
from fastgate.auth.replay import MemoryReplayStore
from fastgate.auth.wire import CONNECTION_LINES, Wire

log = logging.getLogger("fastgate.protocol")

cdef object HttpParserError = httptools.HttpParserError
cdef object HttpParserUpgrade = httptools.HttpParserUpgrade
cdef object HttpRequestParser = httptools.HttpRequestParser
cdef object HttpResponseParser = httptools.HttpResponseParser
cdef object REASON_OK = Reason.OK
cdef object REASON_MISSING = Reason.TOKEN_MISSING
cdef object REASON_KEY_NOT_FOUND = Reason.KEY_NOT_FOUND
cdef object REASON_JWKS_UNAVAILABLE = Reason.JWKS_UNAVAILABLE
cdef object REASON_CERTIFICATE_MISMATCH = Reason.CERTIFICATE_MISMATCH
cdef object REASON_CLAIM_MISSING = Reason.CLAIM_MISSING
cdef object REASON_DPOP_PROOF_INVALID = Reason.DPOP_PROOF_INVALID
cdef object REASON_DPOP_PROOF_REPLAYED = Reason.DPOP_PROOF_REPLAYED
cdef object REASON_DPOP_BINDING_MISMATCH = Reason.DPOP_BINDING_MISMATCH
cdef object REASON_DPOP_NONCE_REQUIRED = Reason.DPOP_NONCE_REQUIRED
cdef object REASON_TOKEN_REPLAYED = Reason.TOKEN_REPLAYED
cdef object REASON_REPLAY_STORE_UNAVAILABLE = Reason.REPLAY_STORE_UNAVAILABLE
#: Claim-header blocks remembered per route (fastgate.dataplane.proxy.RouteRuntime.claim_cache).
cdef Py_ssize_t CLAIM_CACHE_MAX = 4096

cdef object W_BAD_REQUEST = Wire(BAD_REQUEST)
cdef object W_NOT_FOUND = Wire(NOT_FOUND)
cdef object W_METHOD = Wire(METHOD_NOT_ALLOWED)
cdef object W_HEADERS = Wire(HEADERS_TOO_LARGE)
cdef object W_TOO_LARGE = Wire(PAYLOAD_TOO_LARGE)
cdef object W_TIMEOUT = Wire(REQUEST_TIMEOUT)
cdef object W_BAD_GATEWAY = Wire(BAD_GATEWAY)
cdef object W_GATEWAY_TIMEOUT = Wire(GATEWAY_TIMEOUT)
cdef object W_UNAVAILABLE = Wire(SERVICE_UNAVAILABLE)

# RFC 9110 §9.2.2: idempotent methods, resent once when a reused connection was stale.
cdef frozenset IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# RFC 9110 §8.6: methods whose request carries Content-Length even when empty.
cdef frozenset BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# 1xx interim responses (RFC 9110 §15.2) that are swallowed: the gateway answers
# 100-continue itself and forwards no hints.
cdef frozenset INTERIM = frozenset({100, 102, 103})
cdef frozenset HOP = frozenset(n.encode() for n in HOP_BY_HOP)
cdef frozenset NOT_FIELD_NAMES = HOP | {b"close", b""}
cdef frozenset UPGRADE_DROP = frozenset({b"connection", b"keep-alive", b"transfer-encoding",
                                         b"content-length"})
cdef bytes CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
cdef bytes CHUNK_END = b"0\r\n\r\n"
cdef bytes CRLF = b"\r\n"
cdef bytes SEP = b": "
# RFC 9112 §3.2 / RFC 3986 §3.2.2: Host = uri-host [ ":" port ] (reg-name, IPv4 or an IPv6
# literal in brackets); a list, spaces or a userinfo part are not a Host.
# A request id we keep from a trusted proxy: RFC 9110 §5.6.2 token characters, bounded.
cdef object REQUEST_ID_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,200}")
# W3C Trace Context §3.2: version "-" trace-id "-" parent-id "-" flags, lower-case hex; for
# version 00 exactly that; a later version may append "-..." (§3.2.4); ff is invalid.
cdef object TRACEPARENT_RE = re.compile(
    rb"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}(?:-.*)?")
# Request ids this process generates: a random prefix and a counter (unique, cheap).
cdef bytes ID_PREFIX = os.urandom(8).hex().encode()
cdef unsigned long long id_counter = 0
cdef object HOST_RE = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+;=%]*)(?::[0-9]*)?")

# Timer states (one lazily re-armed timer per client connection).
cdef enum:
    T_NONE = 0
    T_IDLE = 1  # between requests (keepalive) or before the first one (header timeout)
    T_HEAD = 2  # a head is arriving
    T_BODY = 3  # a request body is arriving (the route's upstream read_timeout)
    T_SEND = 4  # the client does not take its response
    T_TUNNEL = 5  # WebSocket tunnel idle
    T_LINGER = 6  # answered and half-closed; the unread rest of the request is discarded

#: Lingering close: how long the unread rest of an answered request is read and discarded
#: before the connection closes (closing with unread bytes makes the kernel send a reset,
#: which can destroy the response before the client read it; nginx's lingering_close).
cdef double LINGER_SECONDS = 2.0

# fast_auth outcomes.
cdef enum:
    FA_OK = 0  # admitted: ex.claims (None with allow_missing) and ex.token are set
    FA_DONE = 1  # rejected: answered
    FA_SLOW = 2  # must wait for keys: the slow path
    FA_GENERIC = 3  # not the fast shape: DataPlane.authenticate_now decides

# possess outcomes (proof of possession and replay, after the token is verified).
cdef enum:
    PO_PASS = 0  # nothing more to check: admit goes on
    PO_DONE = 1  # rejected: answered
    PO_WAIT = 2  # the shared replay store answers later (_ReplayWait)

# Exchange states.
cdef enum:
    X_DECIDING = 0
    X_SENDING = 1  # head written upstream; body relayed as it arrives
    X_DONE = 2

# Upstream connection phases (the same values as fastgate.dataplane.upstream_conn's
# _IDLE.._DONE: the pool reads ``phase``).
cdef enum:
    P_IDLE = 0
    P_HEAD = 1
    P_BODY = 2
    P_DONE = 3


cdef inline double monotonic():
    """CLOCK_MONOTONIC in seconds, ns resolution (uvloop's loop.time() moves in whole ms)."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


class _Stop(Exception):
    """Raised from a parser callback to stop parsing (the connection is closing)."""


include "_exchange.pxi"
include "_client.pxi"
include "_slow.pxi"
include "_relay.pxi"
