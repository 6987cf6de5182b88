"""fastgate's source as the tests read it: a ``.pyx`` with its ``include``d ``.pxi`` files."""

from __future__ import annotations

from pathlib import Path


def compiled_source(pyx: Path) -> str:
    """The source Cython compiles for ``pyx``: the file with every ``include "name.pxi"`` line
    replaced by that file's text (``_verify.pyx`` and ``_http.pyx`` are split into included
    files)."""
    out: list[str] = []
    for line in pyx.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("include "):
            out.append(compiled_source(pyx.parent / line.split('"')[1]))
        else:
            out.append(line)
    return "".join(out)
