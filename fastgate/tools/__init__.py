"""Developer and operator tools behind CLI subcommands.

Owns: `fastgate demo` (`demo`; the throw-away services it starts in `demo_services`),
`fastgate explain` (`explain`; `explanation` renders the answer, `explain_keys` loads and
describes the keys), `fastgate token` (`devtoken`) and `fastgate check --online` (`online`).
May import: anything but `fastgate.cli`.
"""
