"""TLS at both ends: the listener's ``ssl.SSLContext`` (SPEC §2 ``tls``) and the client
context of an ``https://`` upstream (SPEC §2 ``upstreams.*.tls``).

Listener (:class:`ListenerTLS`)
-------------------------------
``loop.create_server(..., ssl=listener.context)`` gets one *dispatcher* context. It holds the
connection policy that OpenSSL copies into every new connection: minimum version (TLS 1.2 by
default, RFC 5246; TLS 1.3, RFC 8446, is preferred whenever the client offers it), the client
certificate mode, ALPN ``http/1.1`` (RFC 7301 §3) and no renegotiation. It holds no
certificate: its ``sni_callback`` runs for every ClientHello -- with or without the
server_name extension (RFC 6066 §3) -- and switches the connection to one of the per-certificate
contexts (``SSLObject.context = ...``): an exact server name first, then a ``*.parent``
wildcard (one label, RFC 6125 §6.4.3), else the first (default) certificate. The verification
store of the client CA is that of the switched-to context. (That callback is 0.3 % of a
handshake's user-space instructions, so one certificate gets no special case.)

Session resumption: a returning client resumes from the dispatcher context's session cache
(no session tickets; see :func:`_apply_policy`). The cache is the dispatcher's, so a session
survives a certificate reload like a ticket would.

Reload without a restart: the set of per-certificate contexts is one reference, replaced by
:meth:`ListenerTLS.reload` (``Gateway.swap`` on SIGHUP) and by :meth:`ListenerTLS.check` when a
file's (device, inode, size, mtime) changes (polled every :data:`CERT_POLL_INTERVAL` seconds,
like ``jwks_file``). A new handshake uses the new certificates; an established connection --
keep-alive included -- keeps its session and is never touched. If the new files do not load,
the old contexts stay: on SIGHUP that is a failed reload (``ConfigError``); for a file change
it is logged and reported through ``on_reload(False)`` once the broken files have been seen
twice in a row (a renewal writing the certificate and then the key is not a failure).

Upstreams (:func:`client_context`)
----------------------------------
RFC 9110 §4.3.4: an https upstream is verified -- chain against the system trust store or
``ca_file``, and the name (``server_name`` or the URL's host, also sent as SNI) against the
certificate. ``verify: false`` turns both off and is logged loudly by the pool.

The file checks (:func:`check_certificate`, :func:`check_ca_file`, shared with the config
loader) are ``fastgate.config.certs``'s; they are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from fastgate.config.certs import (
    FileSignature,
    TLSLoadError,
    check_ca_file,
    check_certificate,
    dns_names,
    file_signature,
    valid_server_name,
)

if TYPE_CHECKING:
    from fastgate.config import TlsConfig, UpstreamTlsConfig

__all__ = [
    "ALPN_PROTOCOLS",
    "CERT_POLL_INTERVAL",
    "ListenerTLS",
    "TLSLoadError",
    "TransportSSLObject",
    "check_ca_file",
    "check_certificate",
    "client_context",
    "file_signature",
    "valid_server_name",
]

log = logging.getLogger("fastgate.tls")

#: RFC 7301 §3: the only application protocol the data plane speaks (RFC 9112).
ALPN_PROTOCOLS: Final = ("http/1.1",)
#: Seconds between two stat() rounds of the listener's certificate files.
CERT_POLL_INTERVAL: Final = 5.0
_VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_VERIFY: Final = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
                  "required": ssl.CERT_REQUIRED}



# ---------------------------------------------------------------------------------------------
# The per-connection TLS object
# ---------------------------------------------------------------------------------------------


class TransportSSLObject(ssl.SSLObject):
    """The ``SSLObject`` class of the listener's and the upstreams' contexts
    (``SSLContext.sslobject_class``): what uvloop's TLS transport drives for every
    connection. ``read``, ``write`` and ``pending`` give the ``_ssl`` methods themselves
    instead of ``ssl.py``'s one-line Python wrappers around them: uvloop looks the three up
    once per connection and calls them for every record, so each record saves an interpreter
    frame -- 1 % of the user-space instructions of a keep-alive request over TLS (callgrind,
    benchmarks/RESULTS.md "TLS"). The one difference: ``read`` needs its length argument
    (uvloop always passes it)."""

    read = property(lambda self: self._sslobj.read)
    write = property(lambda self: self._sslobj.write)
    pending = property(lambda self: self._sslobj.pending)


# ---------------------------------------------------------------------------------------------
# Listener
# ---------------------------------------------------------------------------------------------


def _apply_policy(ctx: ssl.SSLContext, cfg: TlsConfig) -> None:
    """What every connection gets, whichever certificate serves it."""
    # PROTOCOL_TLS_SERVER: no SSLv2/3, no compression, Python's secure cipher defaults for
    # TLS 1.2 (ECDHE + AEAD first) and OpenSSL's TLS 1.3 suites (RFC 8446 §9.1).
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    # RFC 5746: secure renegotiation exists, but a client-initiated one only costs the server
    # CPU (TLS 1.3 has none at all, RFC 8446 §4.6.3 replaces it with KeyUpdate).
    # OP_NO_TICKET: returning clients still resume (RFC 8446 §2.2 PSK, RFC 5246 §7.4.1.2
    # session id), from a session cache in this worker's memory instead of from a ticket
    # holding the whole session encrypted under a key that lives as long as the process. Per
    # resumed handshake that skips serialising + encrypting the new session and decrypting +
    # parsing the offered one: 5.5 % of the user-space instructions of a new connection
    # (callgrind, benchmarks/RESULTS.md "TLS"). Tickets would not span workers either: each
    # worker's context has its own random ticket key, as it has its own cache. The cache is
    # OpenSSL's default (at most 20,480 sessions, expired after 2 hours).
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    ctx.set_alpn_protocols(list(ALPN_PROTOCOLS))
    ctx.verify_mode = _VERIFY[cfg.client_auth]


def _certificate_context(cfg: TlsConfig, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_policy(ctx, cfg)
    try:
        ctx.load_cert_chain(cert, key)
        if cfg.client_ca is not None:
            ctx.load_verify_locations(cfg.client_ca)
    except (ssl.SSLError, OSError) as exc:
        raise TLSLoadError(f"OpenSSL refused {cert!r} / {key!r}"
                           + (f" / {cfg.client_ca!r}" if cfg.client_ca else "")
                           + f": {getattr(exc, 'reason', None) or exc}") from None
    return ctx


@dataclass(frozen=True, slots=True)
class _Selection:
    """The per-certificate contexts of one load, and how SNI picks among them."""

    default: ssl.SSLContext
    exact: dict[str, ssl.SSLContext]
    wildcard: dict[str, ssl.SSLContext]  # "example.com" -> the context of "*.example.com"
    names: tuple[tuple[str, ...], ...]  # served names per certificate (logs, tests)

    def pick(self, server_name: str | None) -> ssl.SSLContext:
        if server_name:
            name = server_name.lower().rstrip(".")
            ctx = self.exact.get(name)
            if ctx is not None:
                return ctx
            _, dot, parent = name.partition(".")
            if dot and (ctx := self.wildcard.get(parent)) is not None:
                return ctx
        return self.default  # no SNI (e.g. an IP address) or an unknown name


def _paths(cfg: TlsConfig) -> list[str | None]:
    paths: list[str | None] = []
    for c in cfg.certificates:
        paths += [c.cert, c.key]
    paths.append(cfg.client_ca)
    return paths


def _load_selection(cfg: TlsConfig) -> _Selection:
    """Every certificate of ``cfg`` loaded now; TLSLoadError names the first broken file."""
    if not cfg.certificates:
        raise TLSLoadError("tls: no certificate configured")
    contexts: list[ssl.SSLContext] = []
    exact: dict[str, ssl.SSLContext] = {}
    wildcard: dict[str, ssl.SSLContext] = {}
    served: list[tuple[str, ...]] = []
    now = datetime.datetime.now(datetime.UTC)
    if cfg.client_ca is not None and (problem := check_ca_file(cfg.client_ca)):
        raise TLSLoadError(problem)
    for cert in cfg.certificates:
        problems = check_certificate(cert.cert, cert.key)
        if problems:
            raise TLSLoadError("; ".join(message for _, message in problems))
        ctx = _certificate_context(cfg, cert.cert, cert.key)
        subject, in_cert, not_after = dns_names(cert.cert)
        if not_after < now:
            log.warning("tls: certificate %s (%s) expired at %s; clients will refuse it",
                        cert.cert, subject, not_after.isoformat())
        # Explicit server_names win; else the certificate's own DNS names select it. A name
        # claimed twice goes to the first certificate that has it (config order).
        names = cert.server_names or tuple(in_cert)
        for name in names:
            if name.startswith("*."):
                wildcard.setdefault(name[2:], ctx)
            else:
                exact.setdefault(name, ctx)
        contexts.append(ctx)
        served.append(tuple(names))
    return _Selection(contexts[0], exact, wildcard, tuple(served))


class ListenerTLS:
    """The listener's TLS: the dispatcher ``context`` for ``create_server`` and the
    reloadable per-certificate contexts behind it (see the module doc).

    ``on_reload(ok)`` is called after a reload triggered by a file change (not by
    :meth:`reload`, whose caller counts it): True when the new files are in use, False when
    they were broken and the old certificates stay.
    """

    def __init__(self, cfg: TlsConfig, *,
                 on_reload: Callable[[bool], None] | None = None) -> None:
        self.cfg = cfg
        self.on_reload = on_reload
        self._selection = _load_selection(cfg)  # TLSLoadError: nothing starts
        self._sig = file_signature(_paths(cfg))
        self._pending: FileSignature | None = None  # broken files seen once, not reported yet
        self._task: asyncio.Task[None] | None = None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _apply_policy(ctx, cfg)
        ctx.sni_callback = self._on_client_hello
        ctx.sslobject_class = TransportSSLObject
        self.context = ctx
        self._log_loaded("loaded")

    @property
    def server_names(self) -> tuple[tuple[str, ...], ...]:
        """The names each certificate is chosen for (in config order)."""
        return self._selection.names

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        """The per-certificate context a ClientHello with ``server_name`` gets."""
        return self._selection.pick(server_name)

    def _on_client_hello(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                         _ctx: ssl.SSLContext) -> int | None:
        # RFC 6066 §3: the server_name extension selects the certificate; OpenSSL runs this
        # for every ClientHello (server_name is None without the extension).
        try:
            conn.context = self._selection.pick(server_name)
        except Exception:  # never let a handshake die with a traceback
            log.exception("tls: selecting the certificate failed")
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        return None

    def _log_loaded(self, what: str) -> None:
        for cert, names in zip(self.cfg.certificates, self._selection.names, strict=True):
            log.info("tls: %s %s for %s", what, cert.cert,
                     ", ".join(names) if names else "clients without a matching SNI name")
        if self.cfg.client_ca is not None and self.cfg.client_auth == "none":
            log.warning("tls: client_ca is set but client_auth is none: client certificates "
                        "are not requested")

    # -- reload ---------------------------------------------------------------------------------

    def reload(self, cfg: TlsConfig | None = None) -> None:
        """Load ``cfg`` (default: the current one, re-read from disk) and switch new
        handshakes to it. Raises TLSLoadError and keeps the running certificates when a file
        is broken. Established connections are not affected."""
        self.prepare(cfg)()

    def prepare(self, cfg: TlsConfig | None = None) -> Callable[[], None]:
        """:meth:`reload` in two steps: load now (TLSLoadError: nothing changes), switch
        when the returned function is called (a config reload switches everything at once)."""
        new_cfg = cfg or self.cfg
        sig = file_signature(_paths(new_cfg))
        selection = _load_selection(new_cfg)

        def commit() -> None:
            self._switch(new_cfg, selection, sig)
            self._log_loaded("reloaded")

        return commit

    def _switch(self, cfg: TlsConfig, selection: _Selection, sig: FileSignature) -> None:
        _apply_policy(self.context, cfg)  # copied into connections created from now on
        self.cfg, self._selection, self._sig, self._pending = cfg, selection, sig, None

    def check(self) -> bool | None:
        """Reload if a file changed: True (reloaded), False (broken; the old ones stay and
        this was reported), None (nothing new, or broken once: checked again next time)."""
        sig = file_signature(_paths(self.cfg))
        if sig == self._sig:
            return None
        try:
            selection = _load_selection(self.cfg)
        except TLSLoadError as exc:
            if self._pending != sig:
                self._pending = sig  # maybe half-written (the cert before the key): wait
                return None
            self._sig, self._pending = sig, None  # reported once for these files
            log.error("tls: the changed certificate files do not load; keeping the running "
                      "certificates: %s", exc)
            if self.on_reload is not None:
                self.on_reload(False)
            return False
        self._switch(self.cfg, selection, sig)
        self._log_loaded("reloaded (files changed)")
        if self.on_reload is not None:
            self.on_reload(True)
        return True

    def start(self, interval: float | None = None) -> None:
        """Poll the files every ``interval`` seconds (default :data:`CERT_POLL_INTERVAL`)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._poll(CERT_POLL_INTERVAL if interval is None else interval),
                name="fastgate-tls-files")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.check()
            except Exception:  # never let the poller die: the running certificates stay
                log.exception("tls: certificate file check failed")


# ---------------------------------------------------------------------------------------------
# Upstreams
# ---------------------------------------------------------------------------------------------


def client_context(cfg: UpstreamTlsConfig | None) -> ssl.SSLContext:
    """The client context of an https upstream (RFC 9110 §4.3.4): chain verified against
    ``ca_file`` or the system store, hostname checked (the caller passes ``server_hostname``,
    also sent as SNI, RFC 6066 §3), TLS 1.2 minimum, ALPN http/1.1, optional client
    certificate. Raises TLSLoadError naming the file that does not load."""
    ca_file = cfg.ca_file if cfg is not None else None
    try:
        # create_default_context: CERT_REQUIRED, check_hostname, TLS >= 1.2, and the system
        # store unless a CA file is given (then only that CA: an internal PKI).
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise TLSLoadError(f"OpenSSL refused {ca_file!r}: "
                           f"{getattr(exc, 'reason', None) or exc}") from None
    ctx.set_alpn_protocols(list(ALPN_PROTOCOLS))
    ctx.sslobject_class = TransportSSLObject  # the relay reads through uvloop's transport too
    if cfg is not None and not cfg.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cfg is not None and cfg.cert is not None and cfg.key is not None:
        try:
            ctx.load_cert_chain(cfg.cert, cfg.key)
        except (ssl.SSLError, OSError) as exc:
            raise TLSLoadError(f"OpenSSL refused {cfg.cert!r} / {cfg.key!r}: "
                               f"{getattr(exc, 'reason', None) or exc}") from None
    return ctx


def upstream_files(cfg: UpstreamTlsConfig | None) -> list[str | None]:
    """The files an upstream's client context was built from (to notice a renewal)."""
    if cfg is None:
        return []
    return [cfg.ca_file, cfg.cert, cfg.key]
