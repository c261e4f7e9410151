"""Closing a client right after it cancelled calls leaves nothing for a closed event loop.

gRPC finishes a cancelled call on the event loop a moment later; if the loop has closed,
it logs "Event loop is closed" with a traceback. A child process runs one client per
event loop, cancels each kind of call at points across its round trip, and closes the
client and the loop at once, or closes the client with the call still in flight.
"""

from __future__ import annotations

from collections.abc import Callable

_SCRIPT = """
import asyncio, itertools
import torch
from kvstore.client import ClientOptions, DType, KVClient, KVForm, KVLayout, Namespace
from kvstore.client._loop import LoopThread
from kvstore.server import build_server, load_config

server_loop = LoopThread("server")
config = load_config(None, {"listen": "127.0.0.1:0", "log_level": "warning",
                            "store.dram_bytes": 64 << 20})
running = server_loop.run(build_server(config))
target = f"127.0.0.1:{running.port}"
layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=DType.FLOAT16,
                  block_tokens=64)
namespace = Namespace(tenant="t", model_fingerprint="m", layout=layout)
kv = torch.randn(8, 2, *layout.layer_shape).to(torch.float16)
keys = [b"k%d" % i for i in range(8)]
fresh = itertools.count()

async def put_once():
    async with KVClient(target, namespace) as client:
        await client.put_blocks(keys, kv, form=KVForm.BLOCKS)

async def first_layer_only(client):
    async for arrival in client.iter_layers(keys, form=KVForm.BLOCKS):
        return arrival  # stops the stream after layer 0


CALLS = {
    "unary lookup": lambda client: client.lookup_keys(keys),
    "get": lambda client: client.get_into(keys, torch.empty_like(kv), form=KVForm.BLOCKS),
    "put": lambda client: client.put_blocks(
        [b"p%d-%d" % (next(fresh), i) for i in range(8)], kv, form=KVForm.BLOCKS),
    "stats": lambda client: client.stats(),
    "layers, stopped early": first_layer_only,
}

async def cancel_after(name, delay_s, cancel):
    client = KVClient(target, namespace, options=ClientOptions(lookup_streams=0))
    task = asyncio.create_task(CALLS[name](client))
    await asyncio.sleep(delay_s)
    if cancel:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
    else:
        await client.close()  # the call still in flight, unless it finished already
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

# A prefill worker's layer put, waiting for its next layer when the client closes.
async def close_between_layers(cancel):
    client = KVClient(target, namespace)
    between = asyncio.Event()

    async def layer_put():
        async with client.layer_put([b"l%d-%d" % (next(fresh), i) for i in range(8)]) as put:
            await put.send_layer(0, kv[:, 0])
            between.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(layer_put())
    await between.wait()
    if cancel:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await client.close()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

asyncio.run(put_once())
for name in CALLS:
    for step in range(16):
        asyncio.run(cancel_after(name, step * 0.000125, cancel=step % 4 != 3))
for step in range(24):
    asyncio.run(close_between_layers(cancel=step % 3 == 0))
server_loop.run(running.drain())
server_loop.stop()
print("ok")
"""


def test_closing_right_after_cancelled_calls_logs_nothing(
    run_clean_child: Callable[[str], None],
) -> None:
    run_clean_child(_SCRIPT)
