"""`import kvstore.client` loads the client, not the server's engine."""

from __future__ import annotations

import json
import subprocess
import sys

ENGINE_MODULES = (
    "kvstore.store",
    "kvstore.mover",
    "kvstore.tiers",
    "kvstore.eviction",
    "kvstore.put",
    "kvstore.read",
)


def test_importing_the_client_loads_no_engine_module() -> None:
    # A fresh interpreter: this test process has imported the engine long ago.
    script = "import json, sys, kvstore.client; print(json.dumps(sorted(sys.modules)))"
    output = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    ).stdout
    loaded = json.loads(output)
    assert "kvstore.client" in loaded
    engine = [
        name
        for name in loaded
        if any(name == module or name.startswith(module + ".") for module in ENGINE_MODULES)
    ]
    assert engine == []
