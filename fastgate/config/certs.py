"""Certificate, key and CA files: the checks of the config loader and of every TLS (re)load.

Each file is loaded with ``cryptography`` for precise messages (which file, what is wrong) and
then with OpenSSL (``ssl``) itself, so what passes here is what ``dataplane.tls`` will load.
The data plane's TLS contexts (``fastgate.dataplane.tls``) build on these; the config loader
calls them at load time, so a bad file is a config error naming its path.
"""

from __future__ import annotations

import datetime
import os
import re
import ssl
from collections.abc import Iterable
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

__all__ = [
    "MIN_RSA_BITS",
    "FileSignature",
    "TLSLoadError",
    "check_ca_file",
    "check_certificate",
    "dns_names",
    "file_signature",
    "valid_server_name",
]

#: OpenSSL's default security level 2 refuses smaller RSA keys (112-bit security).
MIN_RSA_BITS: Final = 2048
# RFC 1123 §2.1 LDH labels; RFC 6066 §3: a HostName is a DNS name, never an IP literal.
_LABEL: Final = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DNS_RE: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_NUMERIC_RE: Final = re.compile(r"[0-9.]+")

FileSignature = tuple[tuple[int, int, int, int] | None, ...]


class TLSLoadError(ValueError):
    """A certificate, key or CA file did not load; the message names the path."""




def valid_server_name(name: str, *, wildcard: bool) -> bool:
    """A lower-case DNS name (RFC 6066 §3; an IDN as its A-label); ``*.`` + name with
    ``wildcard``. IP literals are not server names."""
    if wildcard and name.startswith("*."):
        name = name[2:]
    if len(name) > 253 or _NUMERIC_RE.fullmatch(name) or ":" in name:
        return False
    return _DNS_RE.fullmatch(name) is not None


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise TLSLoadError(f"cannot read {path!r}: {exc.strerror or exc}") from None


def _certificates(path: str, data: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSLoadError(f"{path!r} holds no PEM certificate "
                           "(expected -----BEGIN CERTIFICATE-----)") from None
    return certs


def _public_der(key: object) -> bytes:
    public = key.public_key()  # type: ignore[attr-defined]
    der: bytes = public.public_bytes(serialization.Encoding.DER,
                                     serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def _load_pair(cert_path: str, key_path: str) -> list[tuple[str, str]]:
    """Problems of one certificate + key pair as (``cert`` | ``key``, message)."""
    problems: list[tuple[str, str]] = []
    leaf: x509.Certificate | None = None
    try:
        leaf = _certificates(cert_path, _read(cert_path))[0]
    except TLSLoadError as exc:
        problems.append(("cert", str(exc)))
    key: object = None
    try:
        data = _read(key_path)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise TLSLoadError(f"{key_path!r} is an encrypted key: fastgate needs it "
                               "unencrypted (protect the file with its permissions)") from None
        except (ValueError, UnsupportedAlgorithm):
            raise TLSLoadError(f"{key_path!r} holds no PEM private key "
                               "(expected -----BEGIN PRIVATE KEY-----)") from None
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < MIN_RSA_BITS:
                raise TLSLoadError(f"{key_path!r}: RSA key of {key.key_size} bits; at least "
                                   f"{MIN_RSA_BITS} are needed")
        elif not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TLSLoadError(f"{key_path!r}: {type(key).__name__.removeprefix('_')} keys are "
                               "not supported; use RSA or ECDSA")
    except TLSLoadError as exc:
        problems.append(("key", str(exc)))
        key = None
    if problems or leaf is None or key is None:
        return problems
    if _public_der(leaf) != _public_der(key):
        return [("key", f"{key_path!r} does not match the certificate {cert_path!r} (the "
                        "first certificate of the file must be the key's)")]
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as exc:
        return [("cert", f"OpenSSL refused {cert_path!r} with {key_path!r}: "
                         f"{getattr(exc, 'reason', None) or exc}")]
    return []


def check_certificate(cert_path: str, key_path: str) -> list[tuple[str, str]]:
    """The config loader's check of a certificate chain + key (PEM): every problem as
    (``cert`` | ``key``, message naming the file). Empty when both load and match."""
    return _load_pair(cert_path, key_path)


def check_ca_file(path: str) -> str | None:
    """Why ``path`` is not a usable PEM CA bundle, or None."""
    try:
        _certificates(path, _read(path))
        ssl.create_default_context(cafile=path)
    except TLSLoadError as exc:
        return str(exc)
    except (ssl.SSLError, OSError) as exc:
        return f"OpenSSL refused {path!r}: {getattr(exc, 'reason', None) or exc}"
    return None


def file_signature(paths: Iterable[str | None]) -> FileSignature:
    """(device, inode, size, mtime) per file (None: missing): a renewal changes it, also one
    done by swapping a symlink (Kubernetes secret volumes, ``..data``)."""
    out: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        if path is None:
            continue
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def dns_names(cert_path: str) -> tuple[str, list[str], datetime.datetime]:
    """(subject, subjectAltName DNS names, notAfter) of the chain's first certificate."""
    leaf = _certificates(cert_path, _read(cert_path))[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    return leaf.subject.rfc4514_string(), names, leaf.not_valid_after_utc
