"""Build the compiled hot path; everything else lives in pyproject.toml.

fastgate/_verify.pyx: token parsing, checking and verification; fastgate/_http.pyx: the
HTTP/1.1 data plane (client protocol and upstream relay), with fastgate/_flow.pyx (flow
control, its declarations in _flow.pxd); fastgate/_counters.pyx: the metrics counters a
request updates; fastgate/_routes.pyx: the route table (declarations in _routes.pxd)."""

from Cython.Build import cythonize
from setuptools import Extension, setup

# -s: the installed modules carry no symbol tables (a wheel need not ship debug data).
_LINK = ["-s"]
extensions = [
    Extension("fastgate._verify", ["fastgate/_verify.pyx"], extra_link_args=_LINK),
    Extension("fastgate._flow", ["fastgate/_flow.pyx"], extra_link_args=_LINK),
    Extension("fastgate._http", ["fastgate/_http.pyx"], extra_link_args=_LINK),
    Extension("fastgate._counters", ["fastgate/_counters.pyx"], extra_link_args=_LINK),
    Extension("fastgate._routes", ["fastgate/_routes.pyx"], extra_link_args=_LINK),
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
