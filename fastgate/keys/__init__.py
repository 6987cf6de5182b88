"""Key sources: where the verifier's keys come from and how they stay fresh.

Owns: the key-source contract and the base every source shares (`source`), inline and file
keys (`static`, `filekeys`), one HTTP fetch under the fetch rules (`fetch`), OIDC discovery
(`discovery`), the remote source with its refresh and kid-miss handling and the factory
(`jwks`, which re-exports the names of the others), and the key sets a supervisor pushes to
its workers (`sharedkeys`).
May import: `fastgate.token`, `fastgate.config`, the leaf modules.
"""
