"""Type stubs for the compiled route table (fastgate/dataplane/_routes.pyx)."""

import re
from collections.abc import Sequence

from fastgate.config import RouteConfig

def path_is_ambiguous(path: str) -> bool: ...
def host_without_port(host: str) -> str: ...

class Route:
    index: int
    kind: int
    config: RouteConfig
    methods: frozenset[str] | None
    host: str | None
    regex: re.Pattern[str] | None
    name: str
    upstream: str
    path: str
    strip_prefix: bool
    def __init__(self, index: int, config: RouteConfig) -> None: ...
    def matches_path(self, path: str) -> bool: ...
    def rewrite(self, path: str) -> str: ...

class RouteTable:
    routes: tuple[Route, ...]
    def __init__(self, routes: Sequence[RouteConfig]) -> None: ...
    def match(self, method: str, host: str | None, path: str) -> Route | None: ...
    def __len__(self) -> int: ...
