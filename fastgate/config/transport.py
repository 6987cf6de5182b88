"""The transport sections: ``listen``/``admin`` addresses, ``trusted_proxies``, ``upstreams``
(URL, timeouts, pool size, upstream TLS) and the listener's ``tls`` (certificates chosen by SNI,
client certificates).

`TransportSections` adds their readers to the walker (``limits`` and ``timeouts`` are plain
integers and durations, read at the top level). Certificate, key and CA files are checked with
`fastgate.config.certs` now, so a bad file is a config error naming its path.
May import: `fastgate.config.model`, `.syntax`, `.collector`, `.certs`.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, cast
from urllib.parse import urlsplit

from fastgate.config import certs
from fastgate.config.collector import Collector
from fastgate.config.model import (
    Address,
    ClientAuth,
    TlsCertificate,
    TlsConfig,
    TlsVersion,
    UpstreamConfig,
    UpstreamTlsConfig,
    _field_names,
)
from fastgate.config.syntax import _kind

__all__ = ["TransportSections"]


class TransportSections(Collector):
    """Readers of the listen addresses, trusted proxies, upstreams and TLS."""

    def networks(self, value: Any, path: str
                 ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """CIDR networks (or single addresses) of trusted proxies."""
        if not isinstance(value, list):
            self.err(path, f"must be a list of networks, got {_kind(value)}")
            return ()
        out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.err(f"{path}[{i}]", f"must be a network like 10.0.0.0/8, got {_kind(item)}")
                continue
            try:
                out.append(ipaddress.ip_network(item, strict=True))
            except ValueError as exc:
                self.err(f"{path}[{i}]", f"invalid network {item!r}: {exc}")
        return tuple(out)

    def address(self, value: Any, path: str) -> Address | None:
        if not isinstance(value, str):
            self.err(path, f"must be 'host:port', got {_kind(value)}")
            return None
        if m := re.fullmatch(r"\[([^\]]+)\]:(\d{1,5})", value):
            host, port = m.group(1), int(m.group(2))
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                self.err(path, f"invalid IPv6 address {host!r}")
                return None
        elif m := re.fullmatch(r"([^\s:/\[\]]+):(\d{1,5})", value):
            host, port = m.group(1), int(m.group(2))
        else:
            self.err(path, f"must be 'host:port' (IPv6 as '[::1]:9901'), got {value!r}")
            return None
        if port > 65535:
            self.err(path, f"port {port} is out of range 0-65535")
            return None
        return Address(host, port)

    def upstream(self, name: str, value: Any, path: str) -> UpstreamConfig | None:
        m = self.mapping(value, path, _field_names(UpstreamConfig) - {"name"}, required=("url",))
        if m is None:
            return None
        d = UpstreamConfig(name, "")
        url = self.upstream_url(m["url"], f"{path}.url") if "url" in m else None
        timeouts = [self.opt(m, k, path, getattr(d, k), self.duration, positive=True)
                    for k in ("connect_timeout", "read_timeout")]
        max_conn = self.opt(m, "max_connections", path, d.max_connections, self.integer, lo=1)
        tls = None
        if m.get("tls") is not None:
            tls = self.upstream_tls(m["tls"], f"{path}.tls")
            if url is not None and not url.startswith("https://"):
                self.err(f"{path}.tls", "is only for https:// upstream URLs")
        return UpstreamConfig(name, url or "", timeouts[0], timeouts[1], max_conn, tls)

    def upstream_url(self, value: Any, path: str) -> str | None:
        """Normalized to http(s)://host:port[/base] (explicit port, no trailing slash); the
        default port is 80 for http and 443 for https (RFC 9110 §4.2.1, §4.2.2)."""
        url = self.string(value, path)
        if url is None:
            return None
        parts = urlsplit(url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            self.err(path, f"invalid port in {url!r}")
            return None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.err(path, f"must be http://host:port[/path] or https://host:port[/path], "
                           f"got {url!r}")
        elif parts.query or parts.fragment or parts.username is not None:
            self.err(path, "must not contain credentials, a query or a fragment")
        else:
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            return f"{parts.scheme}://{host}:{port}{parts.path.rstrip('/')}"
        return None

    def upstream_tls(self, value: Any, path: str) -> UpstreamTlsConfig | None:
        """``upstreams.NAME.tls``: how the https upstream is verified (RFC 9110 §4.3.4)."""
        m = self.mapping(value, path, _field_names(UpstreamTlsConfig))
        if m is None:
            return None
        ca_file = self.opt(m, "ca_file", path, None, self.pem_path)
        if ca_file is not None and (ca_problem := certs.check_ca_file(ca_file)):
            self.err(f"{path}.ca_file", ca_problem)
        server_name = self.opt(m, "server_name", path, None, self.server_name)
        cert = self.opt(m, "cert", path, None, self.pem_path)
        key = self.opt(m, "key", path, None, self.pem_path)
        if ("cert" in m) != ("key" in m):
            missing = "key" if "cert" in m else "cert"
            self.err(f"{path}.{missing}", "required key is missing (a client certificate needs "
                                          "both cert and key)")
        elif cert is not None and key is not None:
            for which, problem in certs.check_certificate(cert, key):
                self.err(f"{path}.{which}", problem)
        return UpstreamTlsConfig(ca_file=ca_file, server_name=server_name, cert=cert, key=key,
                                 verify=self.opt(m, "verify", path, True, self.boolean))

    def tls(self, value: Any, path: str) -> TlsConfig | None:
        """``tls``: TLS on ``listen`` (RFC 8446, RFC 5246); certificates chosen by SNI."""
        m = self.mapping(value, path, _field_names(TlsConfig), required=("certificates",))
        if m is None:
            return None
        certificates: list[TlsCertificate] = []
        claimed: dict[str, str] = {}  # server name -> path of the certificate that claims it
        raw = m.get("certificates")
        if "certificates" in m and not isinstance(raw, list):
            self.err(f"{path}.certificates", "must be a list of {cert, key[, server_names]}, "
                                             f"got {_kind(raw)}")
        elif isinstance(raw, list) and not raw:
            self.err(f"{path}.certificates", "must not be empty")
        for i, item in enumerate(raw if isinstance(raw, list) else ()):
            cpath = f"{path}.certificates[{i}]"
            c = self.mapping(item, cpath, _field_names(TlsCertificate),
                             required=("cert", "key"))
            if c is None:
                continue
            cert = self.opt(c, "cert", cpath, None, self.pem_path)
            key = self.opt(c, "key", cpath, None, self.pem_path)
            if cert is not None and key is not None:
                for which, problem in certs.check_certificate(cert, key):
                    self.err(f"{cpath}.{which}", problem)
            names: tuple[str, ...] = ()
            if "server_names" in c:
                listed = self.names(c["server_names"], f"{cpath}.server_names",
                                    what="server name") or ()
                names = tuple(n.lower() for n in listed)
                for j, name in enumerate(names):
                    npath = f"{cpath}.server_names[{j}]"
                    if not certs.valid_server_name(name, wildcard=True):
                        self.err(npath, f"invalid server name {name!r}: a DNS name, optionally "
                                        "starting with '*.' (RFC 6066 §3: no IP addresses)")
                    elif name in claimed:
                        self.err(npath, f"server name {name!r} is already served by "
                                        f"{claimed[name]}")
                    else:
                        claimed[name] = cpath
            if cert is not None and key is not None:
                certificates.append(TlsCertificate(cert, key, names))
        min_version = "1.2"
        if "min_version" in m:
            raw_version = self._from_env(m["min_version"], f"{path}.min_version")
            if isinstance(raw_version, float) and raw_version in (1.2, 1.3):
                raw_version = str(raw_version)  # `min_version: 1.3` unquoted is a YAML float
            min_version = self.choice(raw_version, f"{path}.min_version", ("1.2", "1.3")) \
                or "1.2"
        client_ca = self.opt(m, "client_ca", path, None, self.pem_path)
        if client_ca is not None and (ca_problem := certs.check_ca_file(client_ca)):
            self.err(f"{path}.client_ca", ca_problem)
        client_auth = self.opt(m, "client_auth", path, "none", self.choice,
                               options=("none", "optional", "required"))
        if client_auth != "none" and "client_ca" not in m:
            self.err(f"{path}.client_ca", f"required key is missing (client_auth: {client_auth} "
                                          "verifies client certificates against this CA file)")
        if not certificates:
            return None
        return TlsConfig(certificates=tuple(certificates),
                         min_version=cast(TlsVersion, min_version), client_ca=client_ca,
                         client_auth=cast(ClientAuth, client_auth))

    def pem_path(self, value: Any, path: str) -> str | None:
        """A PEM file (certificate, key or CA bundle): absolute, relative to the config file,
        and readable now. abspath, not realpath: a Kubernetes secret mount swaps a symlink."""
        full, readable = self.readable_file(value, path)
        return full if readable else None

    def server_name(self, value: Any, path: str) -> str | None:
        name = self.string(value, path)
        if name is None:
            return None
        if not certs.valid_server_name(name.lower(), wildcard=False):
            self.err(path, f"invalid server name {name!r}: a DNS name (RFC 6066 §3)")
            return None
        return name.lower()
