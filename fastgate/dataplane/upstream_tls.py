"""TLS towards an https upstream (SPEC §2 ``upstreams.*.tls``, RFC 9110 §4.3.4).

Every connection of an https upstream is TLS with the client context of
:func:`fastgate.dataplane.tls.client_context`: the chain verified against the system trust
store or ``ca_file``, the name (``server_name`` or the URL's host) sent as SNI and checked
against the certificate (RFC 6066 §3), an optional client certificate (``cert`` / ``key``).
``verify: false`` turns both checks off and is logged loudly here. The files the context was
built from are watched (:attr:`UpstreamTLS.files_changed`: a reload then builds a new pool). A
handshake that fails is an :class:`~fastgate.dataplane.upstream_errors.UpstreamError` of kind
``tls`` (:func:`handshake_error`).
"""

from __future__ import annotations

import logging
import ssl

from fastgate.config import UpstreamConfig
from fastgate.dataplane import tls
from fastgate.dataplane.upstream_errors import UpstreamError

__all__ = ["UpstreamTLS", "handshake_error"]

log = logging.getLogger("fastgate.upstream")


class UpstreamTLS:
    """The TLS side of one upstream's connections (no context for an http upstream)."""

    __slots__ = ("_tls_files", "_tls_signature", "context", "server_hostname")

    def __init__(self, config: UpstreamConfig, host: str, port: int, *, https: bool) -> None:
        #: The client TLS context (https only) and the name sent as SNI and checked against
        #: the certificate (RFC 6066 §3; an IP literal is matched against IP SANs, no SNI).
        self.context: ssl.SSLContext | None = None
        self.server_hostname: str | None = None
        self._tls_files = tls.upstream_files(config.tls)
        self._tls_signature = tls.file_signature(self._tls_files)
        if https:
            try:
                self.context = tls.client_context(config.tls)
            except tls.TLSLoadError as exc:
                raise ValueError(f"tls: {exc}") from None
            self.server_hostname = (config.tls.server_name if config.tls is not None
                                    and config.tls.server_name else host)
            if config.tls is not None and not config.tls.verify:
                log.warning(
                    "upstream %s: TLS VERIFICATION IS OFF (tls.verify: false): any server "
                    "that answers on %s:%d is trusted and can read and alter every request "
                    "and token sent to it; use tls.ca_file for a private CA instead",
                    config.name, host, port)

    @property
    def files_changed(self) -> bool:
        """True when a CA, certificate or key file of ``tls`` changed since this was built."""
        return tls.file_signature(self._tls_files) != self._tls_signature


def handshake_error(exc: ssl.SSLError, host: str, port: int,
                    server_hostname: str | None) -> UpstreamError:
    """What a TLS handshake with ``host:port`` that raised ``exc`` is: a ``tls`` failure."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        # RFC 9110 §4.3.4: an https upstream whose certificate does not verify (chain,
        # name or validity period) is not the upstream.
        return UpstreamError(
            "tls", f"certificate of {host}:{port} (as "
                   f"{server_hostname}) not accepted: "
                   f"{exc.verify_message or exc.reason}")
    return UpstreamError(
        "tls", f"TLS handshake with {host}:{port} failed: "
               f"{exc.reason or exc}")
