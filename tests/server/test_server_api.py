"""Guards kvstore.server's public surface: a change here is an API change, made on purpose."""

from __future__ import annotations

import kvstore.server

EXPECTED_SERVER_API = [
    "Limits",
    "RunningServer",
    "ServerConfig",
    "build_server",
    "load_config",
    "serve",
]


def test_server_all_is_exactly_the_published_list() -> None:
    assert sorted(kvstore.server.__all__) == EXPECTED_SERVER_API


def test_star_import_exports_the_list() -> None:
    namespace: dict[str, object] = {}
    exec("from kvstore.server import *", namespace)
    assert sorted(name for name in namespace if not name.startswith("__")) == EXPECTED_SERVER_API
