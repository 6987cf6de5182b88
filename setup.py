"""Build the compiled hot path; everything else lives in pyproject.toml.

fastgate/token/_verify.pyx: token parsing, checking and verification; fastgate/dataplane/_http.pyx: the
HTTP/1.1 data plane (client protocol and upstream relay), with fastgate/dataplane/_flow.pyx (flow
control, its declarations in _flow.pxd); fastgate/ops/_counters.pyx: the metrics counters a
request updates; fastgate/dataplane/_routes.pyx: the route table (declarations in _routes.pxd)."""

from Cython.Build import cythonize
from setuptools import Extension, setup

# -s: the installed modules carry no symbol tables (a wheel need not ship debug data).
_LINK = ["-s"]
extensions = [
    Extension("fastgate.token._verify", ["fastgate/token/_verify.pyx"], extra_link_args=_LINK),
    Extension("fastgate.dataplane._flow", ["fastgate/dataplane/_flow.pyx"], extra_link_args=_LINK),
    Extension("fastgate.dataplane._http", ["fastgate/dataplane/_http.pyx"], extra_link_args=_LINK),
    Extension("fastgate.ops._counters", ["fastgate/ops/_counters.pyx"], extra_link_args=_LINK),
    Extension("fastgate.dataplane._routes", ["fastgate/dataplane/_routes.pyx"], extra_link_args=_LINK),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "embedsignature": True,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        },
    ),
)
