"""The worker side of the vLLM connector: loads and saves vLLM's paged KV cache layer by layer
through a `KVConnector`, as the scheduler side's metadata says.

Per step: binding the metadata (before the forward pass) opens one put per request that
fills blocks, and `start_load_kv` starts one fetch of every block the step loads; in each
attention layer `wait_for_layer_load` waits for that layer's pages and `save_kv_layer`
queues the layer for every put. With `saves_after_forward` (caches on the CPU, by
default) the puts open, and take every layer, in `wait_for_save` instead, so that they do
not share the cores the pass runs on. `wait_for_save` does not wait for the puts: they
finish while later steps run, and a request's blocks are kept until
`get_finished` lists it (the scheduler side returned True from `request_finished`). So the
time to first token never includes a save.

A failed load never leaves wrong pages in use: every block of the step's load is reported by
`get_block_ids_with_load_errors`, and vLLM recomputes from the first of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from kvstore.client._step_clock import StepClock
from kvstore.client._vllm_config import ConnectorConfig
from kvstore.client._vllm_metadata import TIER_RATE_PREFIX, KVStoreConnectorMetadata, SaveSpec
from kvstore.client.connector import KVConnector, KVLoadError, KVSaveError, SaveHandle

logger = logging.getLogger(__name__)

# A step that computes fewer tokens than this is decoding: it says nothing of prefill speed.
_MIN_PREFILL_SAMPLE_TOKENS = 64
_RATE_SMOOTHING = 0.5  # weight of the newest sample in the moving averages
# Save reports kept for inspection (tests, the emulator); older ones are dropped.
MAX_SAVE_REPORTS = 1024


class RegisteredCache:
    """`PagedCache` over the per-layer tensors vLLM registers.

    vLLM's attention backends lay a layer out either as ``[2, num_blocks, block_size, heads,
    head_dim]`` (FlashAttention: K and V first) or ``[num_blocks, 2, block_size, heads,
    head_dim]`` (FlashInfer, and the emulator's model); a block-layer of the store is
    ``[2, block_size, heads, head_dim]``, a view of either.
    """

    def __init__(
        self, kv_caches: dict[str, torch.Tensor], layer_shape: tuple[int, ...], dtype: torch.dtype
    ) -> None:
        if not kv_caches:
            raise ValueError("register_kv_caches: no KV cache tensors")
        self.layer_names = list(kv_caches)
        self._tensors = list(kv_caches.values())
        first = self._tensors[0]
        inner = tuple(layer_shape[1:])
        if first.dim() == 5 and first.shape[1] == 2 and tuple(first.shape[2:]) == inner:
            self._kv_first = False
        elif first.dim() == 5 and first.shape[0] == 2 and tuple(first.shape[2:]) == inner:
            self._kv_first = True
        else:
            raise ValueError(
                f"KV cache layer {self.layer_names[0]!r} is {tuple(first.shape)}; the connector's "
                f"layout needs [2, blocks, {', '.join(map(str, inner))}] or "
                f"[blocks, 2, {', '.join(map(str, inner))}] (check block_size, num_kv_heads, "
                "head_dim in kv_connector_extra_config)"
            )
        for name, tensor in kv_caches.items():
            if tensor.shape != first.shape or tensor.dtype != dtype:
                raise ValueError(
                    f"KV cache layer {name!r} is {tuple(tensor.shape)} {tensor.dtype}; "
                    f"expected {tuple(first.shape)} {dtype}"
                )
        self.layer_index = {name: index for index, name in enumerate(self.layer_names)}

    def page_view(self, layer: int, page: int) -> torch.Tensor:
        tensor = self._tensors[layer]
        return tensor[:, page] if self._kv_first else tensor[page]


@dataclass(frozen=True)
class LoadReport:
    num_blocks: int
    num_bytes: int
    stall_s: float  # the forward pass's wait in wait_for_layer_load
    error: str | None = None  # why it failed; its blocks were reported for recompute


@dataclass
class SaveReport:
    num_committed: int = 0
    errors: list[str] = field(default_factory=list)


class WorkerSide:
    def __init__(self, config: ConnectorConfig) -> None:
        self.config = config
        self._engine: KVConnector | None = None
        self._cache: RegisteredCache | None = None
        self._saves: dict[str, list[SaveHandle]] = {}  # request id -> its puts not reported
        self._finishing: set[str] = set()  # finished in vLLM, saves maybe still running
        self._load_block_ids: list[int] = []  # the blocks of the step's load
        self._load_failed = False
        self._failed_block_ids: set[int] = set()
        self._clock: StepClock | None = None  # times steps, once caches are registered
        self.prefill_tokens_per_s: float | None = None
        self._step_saves: list[tuple[str, SaveHandle]] = []  # (request id, put) of this step
        self._loading_request_ids: set[str] = set()  # requests whose load this step runs
        # The step under way (its saves open) until wait_for_save, and whether its forward
        # pass has started saving layers.
        self._step_metadata: KVStoreConnectorMetadata | None = None
        self._forward_seen = False
        # Whether saves wait for the forward pass to end (config.save_during_forward,
        # decided by the caches' device when "auto"), and the layers it has saved so far.
        self.saves_after_forward = False
        self._layers_to_queue: list[int] = []
        self._unopened_saves: list[SaveSpec] = []  # the step's saves, until the pass ends
        # Of the last MAX_SAVE_REPORTS requests get_finished reported, oldest first.
        self.save_reports: dict[str, SaveReport] = {}
        self.last_load: LoadReport | None = None  # the last step's load, if it had one

    # -- registration ------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layout = self.config.namespace.layout
        if len(kv_caches) != layout.num_layers:
            raise ValueError(
                f"vLLM registered {len(kv_caches)} KV cache layers; kv_connector_extra_config "
                f"says num_layers={layout.num_layers}"
            )
        self._cache = RegisteredCache(kv_caches, layout.layer_shape, layout.dtype.torch_dtype)
        device = next(iter(kv_caches.values())).device
        self._clock = StepClock(device)
        during = self.config.save_during_forward
        # On the CPU the pass and the saves' copies and sends would share the same cores,
        # and the first token would wait for both.
        self.saves_after_forward = not during if during is not None else device.type == "cpu"
        self._engine = KVConnector(
            self.config.target, self.config.namespace, self._cache, options=self.config.options
        )

    def _require(self) -> tuple[KVConnector, RegisteredCache]:
        if self._engine is None or self._cache is None:
            raise RuntimeError("register_kv_caches was not called")
        return self._engine, self._cache

    # -- a step ------------------------------------------------------------------------------

    def handle_preemptions(self, metadata: KVStoreConnectorMetadata) -> None:
        preempted = metadata.preempted_req_ids
        for req_id in preempted:
            for handle in self._saves.pop(req_id, []):
                handle.abort()
        self._unopened_saves = [s for s in self._unopened_saves if s.request_id not in preempted]

    def begin_step(self, metadata: KVStoreConnectorMetadata, num_step_tokens: int) -> None:
        """Start the step once, before its forward pass: time it, and open its saves (with
        `saves_after_forward`, only note them: they open when the pass has ended). Called
        when the metadata is bound, which vLLM does before the forward pass in every
        release (its `start_load_kv` comes after the pass on steps without synchronous
        loads since mid-2026), and again, doing nothing, from `start_load_kv`."""
        if metadata is self._step_metadata:
            return
        engine, _ = self._require()
        if self._step_metadata is not None:  # the last step had no wait_for_save
            self._forget_unopened_saves()
            self._abort_unfed_saves()
            if self._clock is not None:
                self._clock.cancel()
        # Layers saved outside a step (a warm-up or dummy forward pass) belong to none.
        self._layers_to_queue = []
        self._step_metadata = metadata
        self._forward_seen = False
        self._load_failed = False
        self._load_block_ids = []
        self._loading_request_ids = set()
        self.handle_preemptions(metadata)  # before the saves open: a preempted chain restarts
        if self._clock is not None:
            self._clock.start(num_step_tokens)
        self._step_saves = []
        if self.saves_after_forward:
            self._unopened_saves = list(metadata.saves)
        else:
            self._open_saves(engine, metadata.saves)

    def _open_saves(
        self, engine: KVConnector, saves: list[SaveSpec], *, layers_ready: int = 0
    ) -> None:
        for save in saves:
            chain = self._saves.setdefault(save.request_id, [])
            handle = engine.open_save(
                save.keys,
                save.block_ids,
                parent_key=save.parent_key,
                after=chain[-1] if chain else None,
                skip_stored=save.skip_stored,
                layers_ready=layers_ready,
            )
            chain.append(handle)
            self._step_saves.append((save.request_id, handle))

    def _drop_saves_of(self, request_ids: set[str]) -> None:
        """Drop this step's saves of `request_ids`: their new K/V attended over pages
        that never arrived."""
        for req_id, handle in self._step_saves:
            if req_id in request_ids:
                handle.abort()
        self._forget_unopened_saves(request_ids)

    def _forget_unopened_saves(self, request_ids: set[str] | None = None) -> None:
        """Drop the unopened saves of `request_ids` (None: all). Their requests are still
        reported by `get_finished`: the scheduler side waits for every request it planned
        a save for."""
        kept = []
        for save in self._unopened_saves:
            if request_ids is None or save.request_id in request_ids:
                self._saves.setdefault(save.request_id, [])
            else:
                kept.append(save)
        self._unopened_saves = kept

    def start_load_kv(self, metadata: KVStoreConnectorMetadata, num_step_tokens: int) -> None:
        engine, _ = self._require()
        self.begin_step(metadata, num_step_tokens)
        block_ids = [block for load in metadata.loads for block in load.block_ids]
        if not block_ids:
            return
        if self._forward_seen:
            # The forward pass has already read these pages: loading them now would leave
            # its output computed over whatever they held. vLLM recomputes them instead.
            logger.error(
                "kvstore: start_load_kv came after the forward pass with %d blocks to load "
                "(vLLM defers it only on steps without synchronous loads); they are "
                "reported as load errors and recomputed",
                len(block_ids),
            )
            self._failed_block_ids.update(block_ids)
            self._drop_saves_of({load.request_id for load in metadata.loads})
            return
        self._load_block_ids = block_ids
        self._loading_request_ids = {load.request_id for load in metadata.loads}
        try:
            engine.start_load_kv([key for load in metadata.loads for key in load.keys], block_ids)
        except ValueError as error:  # page ids this cache cannot take: nothing was started
            self._fail_load(engine, KVLoadError(f"the load was refused: {error}"))

    def wait_for_layer_load(self, layer_name: str) -> None:
        engine, cache = self._require()
        if self._load_failed:
            return
        try:
            engine.wait_for_layer_load(cache.layer_index[layer_name])
        except KVLoadError as error:
            self._fail_load(engine, error)

    def _fail_load(self, engine: KVConnector, error: KVLoadError) -> None:
        logger.warning("kvstore load failed; vLLM recomputes its blocks: %s", error)
        self._load_failed = True
        self._failed_block_ids.update(self._load_block_ids)
        self.last_load = LoadReport(0, 0, 0.0, error=str(error))
        engine.abort_load()
        # The new K/V of the requests that loaded attends over pages that did not arrive:
        # none of it may reach the store (the scheduler side saves those blocks again once
        # recomputed). Requests that loaded nothing computed over their own pages: their
        # saves go on.
        self._drop_saves_of(self._loading_request_ids)

    def save_kv_layer(self, layer_name: str) -> None:
        engine, cache = self._require()
        self._forward_seen = True
        if self.saves_after_forward:
            self._layers_to_queue.append(cache.layer_index[layer_name])
        else:
            engine.save_kv_layer(cache.layer_index[layer_name])

    def _queue_saved_layers(self, engine: KVConnector) -> None:
        """With `saves_after_forward`: the pass has ended, so open the step's saves and
        hand them every layer it saved. A pass that skipped a layer leaves saves that
        could never complete: they are not opened (their blocks are a future miss)."""
        saves = self._unopened_saves
        layers, self._layers_to_queue = self._layers_to_queue, []
        if not saves:
            return
        if layers != list(range(self.config.namespace.layout.num_layers)):
            logger.warning(
                "kvstore: the forward pass saved layers %s, not every layer; this step's "
                "saves of %d requests are dropped",
                layers,
                len(saves),
            )
            self._forget_unopened_saves()
            return
        self._unopened_saves = []
        self._open_saves(engine, saves, layers_ready=len(layers))

    def wait_for_save(self) -> None:
        """End the step: close its load (every layer is in place by now) and measure it. The
        puts run on: their blocks are held until `get_finished` reports the request."""
        engine, _ = self._require()
        if self._load_block_ids and not self._load_failed:
            try:
                stats = engine.wait_for_load()
            except KVLoadError as error:
                self._fail_load(engine, error)
            else:
                self.last_load = LoadReport(stats.num_blocks, stats.num_bytes, stats.stall_s)
        elif not self._load_block_ids:
            self.last_load = None
        self._measure_prefill()  # the pass alone, not the saves opened after it
        self._queue_saved_layers(engine)
        self._abort_unfed_saves()
        self._load_block_ids = []
        self._step_metadata = None

    def _abort_unfed_saves(self) -> None:
        """A save of this step that did not get every layer (the forward pass skipped a
        save_kv_layer, or failed part way) can never complete: drop it now, so the next
        step's saves start from layer 0. Its blocks are a future miss, and the saves
        chained after it fail on their missing parent; no wrong bytes are stored."""
        for req_id, handle in self._step_saves:
            if not handle.fully_queued and not handle.done():
                logger.warning(
                    "kvstore: request %s's save got only some layers this step; dropped",
                    req_id,
                )
                handle.abort()
        self._step_saves = []

    def _measure_prefill(self) -> None:
        if self._clock is None:
            return
        if self._load_block_ids:
            self._clock.cancel()  # a step that loaded also waited on the network
        else:
            self._clock.end()
        self._take_prefill_samples()

    def _take_prefill_samples(self) -> None:
        if self._clock is None:
            return
        for num_tokens, seconds in self._clock.finished():
            if num_tokens >= _MIN_PREFILL_SAMPLE_TOKENS and seconds > 0:
                self.prefill_tokens_per_s = _smooth(self.prefill_tokens_per_s, num_tokens / seconds)

    # -- completion --------------------------------------------------------------------------

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self._finishing.update(req_id for req_id in finished_req_ids if req_id in self._saves)
        done: set[str] = set()
        for req_id in list(self._finishing):
            handles = self._saves[req_id]
            if all(handle.done() for handle in handles):
                for handle in handles:
                    self._record_save(req_id, handle)
                del self._saves[req_id]
                self._finishing.discard(req_id)
                done.add(req_id)
        return (done or None), None

    def _record_save(self, req_id: str, handle: SaveHandle) -> None:
        report = self.save_reports.get(req_id)
        if report is None:
            while len(self.save_reports) >= MAX_SAVE_REPORTS:
                del self.save_reports[next(iter(self.save_reports))]
            report = self.save_reports[req_id] = SaveReport()
        try:
            report.num_committed += handle.result(0).num_committed
        except KVSaveError as error:
            # A dropped save is a future miss, never wrong data: the server drops the put.
            report.errors.append(str(error))
            logger.warning("kvstore save of request %s failed: %s", req_id, error)

    def saves_in_flight(self, req_id: str) -> list[SaveHandle]:
        return list(self._saves.get(req_id, ()))

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_block_ids = self._failed_block_ids, set()
        return failed

    def stats(self) -> dict[str, float]:
        """What the scheduler side plans with: the bandwidth the client's gets delivered
        (kvstore.client.cost.BandwidthMeter) and the prefill rate of steps that loaded
        nothing."""
        self._take_prefill_samples()  # CUDA steps the GPU has finished since
        data: dict[str, float] = {}
        fetch_bytes_per_s = self._engine.bandwidth.rate() if self._engine is not None else None
        if fetch_bytes_per_s is not None:
            data["fetch_bytes_per_s"] = fetch_bytes_per_s
        if self._engine is not None:
            for tier in {tier for _, tier in self._engine.bandwidth.snapshot()}:
                rate = self._engine.bandwidth.rate(tier=tier)
                if tier and rate is not None:
                    data[f"{TIER_RATE_PREFIX}{tier}"] = rate
        if self.prefill_tokens_per_s is not None:
            data["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        return data

    def abort_all(self) -> None:
        """Cancel every load and save in flight, and forget them (a request torn down)."""
        if self._engine is not None:
            self._engine.abort()
        self._saves.clear()
        self._finishing.clear()
        self._load_block_ids = []
        self._unopened_saves, self._layers_to_queue = [], []

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def _smooth(previous: float | None, sample: float) -> float:
    if previous is None:
        return sample
    return (1 - _RATE_SMOOTHING) * previous + _RATE_SMOOTHING * sample
