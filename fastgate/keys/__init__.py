"""Key sources: where the verifier's keys come from and how they stay fresh.

Owns: JWKS and OIDC discovery fetches, refresh and kid-miss handling (`jwks`), and the key
sets a supervisor pushes to its workers (`sharedkeys`).
May import: `fastgate.token`, `fastgate.config`, the leaf modules.
"""
