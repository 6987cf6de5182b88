"""Developer and operator tools behind CLI subcommands.

Owns: `fastgate demo` (`demo`), `fastgate explain` (`explain`), `fastgate token` (`devtoken`)
and `fastgate check --online` (`online`).
May import: anything but `fastgate.cli`.
"""
