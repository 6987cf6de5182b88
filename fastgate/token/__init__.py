"""The compiled verifier and the closed set of reject reasons.

Owns: token parsing, checking and signature verification (`_verify.pyx`, the one
implementation; its parts are the included `.pxi` files it lists), the verified-token cache,
and `Reason` (`reasons`: the closed set of reject reasons, SPEC §4).
May import: nothing of fastgate's but the leaf modules (`fastgate.errors`).
Everything else imports this package; it is the bottom layer.
"""
