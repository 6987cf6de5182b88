"""fastgate: a JWT-validating edge reverse proxy with a compiled verifier hot path."""

from __future__ import annotations

from fastgate.token.reasons import Reason

try:
    from fastgate.token._verify import (
        IssuerSet,
        KeyReport,
        Result,
        TokenCache,
        Verifier,
        verify_jws,
    )
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    # SPEC §1: no silent pure-Python fallback; say how to get the compiled hot path.
    raise ImportError(
        "fastgate's compiled verifier (fastgate.token._verify) is missing. Build it with "
        "`pip install .` (or `pip install -e .` / `python setup.py build_ext --inplace` "
        "in a checkout); it needs a C compiler and the Python headers."
    ) from exc

__version__ = "0.1.0"

__all__ = [
    "IssuerSet",
    "KeyReport",
    "Reason",
    "Result",
    "TokenCache",
    "Verifier",
    "__version__",
    "verify_jws",
]
