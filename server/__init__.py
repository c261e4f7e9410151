"""The kvstore daemon: configuration, the gRPC servicer, and `kvstore-server`."""

from kvstore.server.app import RunningServer, build_server, serve
from kvstore.server.config import Limits, ServerConfig, load_config

__all__ = ["Limits", "RunningServer", "ServerConfig", "build_server", "load_config", "serve"]
