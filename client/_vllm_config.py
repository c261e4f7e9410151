"""The vLLM connector's settings, read from `kv_transfer_config.kv_connector_extra_config`.

Every key, with its default (see the README's "In vLLM" section):

    target              HOST:PORT, etcd://..., etcds://... or cluster://... of the store
                        (required)
    tenant              the namespace's tenant (default "vllm")
    model_fingerprint   what the KV depends on: weights, revision, dtype... (required)
    block_size          tokens per block; must equal vLLM's --block-size (required)
    num_layers, num_kv_heads, head_dim, dtype
                        the KV layout per worker (required; the worker checks them against
                        the caches vLLM registers); dtype: float16 | bfloat16 | float32 ...
    tp_rank, tp_size    this worker's tensor-parallel shard (default 0 of 1); only without
                        vLLM's parallel config, which decides it under vLLM
    token               bearer token (default: the KVSTORE_TOKEN environment variable)
    tls_ca, tls_cert, tls_key, tls_server_name
                        TLS files (PEM) and the name to check; any one turns TLS on
    etcd_ca, etcd_cert, etcd_key, etcd_server_name, etcd_user, etcd_password_file
                        a secured etcd's TLS files (PEM), the name to check, and etcd
                        credentials (the password: the file's first line, or the
                        KVSTORE_ETCD_PASSWORD variable); each over its KVSTORE_ETCD_*
                        variable (default: those variables)
    data_plane          carry bytes over the store's TCP data plane (default true)
    prefill_tokens_per_s, prefill_fixed_s
                        the model's prefill rate, for fetch-or-recompute (default: none,
                        which fetches every stored block)
    fetch_overhead_s    fixed cost of starting one fetch (default 0)
    fetch_bytes_per_s   the bandwidth to assume until one is measured (default: none)
    remeasure_s         while every rate is below break-even (nothing is fetched, so
                        nothing is measured), fetch a few blocks of one match this often
                        to measure the store again (default 60; 0: never)
    pin_ttl_s           how long a finished request's chain stays pinned: the think time
                        of an agent's tool call (default 0: no pin)
    save_decoded        also save the full blocks that decoding fills (default true)
    save_during_forward send each layer's saves while later layers compute (true), or
                        all of them once the forward pass ends (false); default "auto":
                        during the pass when the KV caches are on a GPU, after it when
                        they are on the CPU, whose cores the pass itself needs
    lookup_timeout_s    the longest the scheduler waits for a lookup (default 2); after one
                        fails, lookups pause (1 s, doubling to 30 s) and requests recompute
    block_view          follow the store's block events and take a request whose first
                        block the store lacks for a miss with no lookup
                        (default false); a block stored within the events' delay then
                        counts as missing and is recomputed
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvstore.client._options import ClientOptions, Timeouts, TLSOptions
from kvstore.cluster.etcd_options import EtcdOptions
from kvstore.errors import InvalidRequest
from kvstore.layout import DType, KVLayout, Namespace

_DTYPES = {dtype.name.lower(): dtype for dtype in DType}
DEFAULT_REMEASURE_S = 60.0
# Connector key: EtcdOptions field.
_ETCD_KEYS = {
    "etcd_ca": "ca_file",
    "etcd_cert": "cert_file",
    "etcd_key": "key_file",
    "etcd_server_name": "server_name",
    "etcd_user": "user",
    "etcd_password_file": "password_file",
}
_KNOWN_KEYS = frozenset(
    {
        "target",
        "tenant",
        "model_fingerprint",
        "block_size",
        "num_layers",
        "num_kv_heads",
        "head_dim",
        "dtype",
        "tp_rank",
        "tp_size",
        "token",
        "tls_ca",
        "tls_cert",
        "tls_key",
        "tls_server_name",
        *_ETCD_KEYS,
        "data_plane",
        "prefill_tokens_per_s",
        "prefill_fixed_s",
        "fetch_overhead_s",
        "fetch_bytes_per_s",
        "remeasure_s",
        "pin_ttl_s",
        "save_decoded",
        "save_during_forward",
        "lookup_timeout_s",
        "block_view",
    }
)


class ConnectorConfigError(ValueError):
    """kv_connector_extra_config is missing a key or holds a bad value."""


@dataclass(frozen=True, kw_only=True)
class ConnectorConfig:
    target: str
    namespace: Namespace
    options: ClientOptions
    prefill_tokens_per_s: float | None
    prefill_fixed_s: float
    fetch_overhead_s: float
    fetch_bytes_per_s: float | None
    remeasure_s: float
    pin_ttl_s: float
    save_decoded: bool
    save_during_forward: bool | None = None  # None: "auto", by the caches' device
    block_view: bool = False  # misses told by the store's block events, with no lookup

    @property
    def block_tokens(self) -> int:
        return self.namespace.layout.block_tokens

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any]) -> ConnectorConfig:
        """Parse and check `kv_connector_extra_config`; `ConnectorConfigError` names the key."""
        unknown = sorted(set(extra) - _KNOWN_KEYS)
        if unknown:
            raise ConnectorConfigError(
                f"kv_connector_extra_config: unknown key(s) {unknown}; known: {sorted(_KNOWN_KEYS)}"
            )
        dtype_name = _string(extra, "dtype").lower()
        if dtype_name not in _DTYPES:
            raise ConnectorConfigError(
                f"kv_connector_extra_config.dtype: {dtype_name!r} is not one of {sorted(_DTYPES)}"
            )
        try:
            layout = KVLayout(
                num_layers=_integer(extra, "num_layers"),
                num_kv_heads=_integer(extra, "num_kv_heads"),
                head_dim=_integer(extra, "head_dim"),
                dtype=_DTYPES[dtype_name],
                block_tokens=_integer(extra, "block_size"),
            )
            namespace = Namespace(
                tenant=_string(extra, "tenant") if "tenant" in extra else "vllm",
                model_fingerprint=_string(extra, "model_fingerprint"),
                layout=layout,
                tp_rank=_integer(extra, "tp_rank", 0),
                tp_size=_integer(extra, "tp_size", 1),
            )
            lookup_timeout_s = _optional_positive(extra, "lookup_timeout_s")
            options = ClientOptions(
                token=_optional_string(extra, "token"),
                tls=_tls(extra),
                etcd=_etcd(extra),
                data_plane=_boolean(extra, "data_plane", True),
                timeouts=Timeouts(lookup=lookup_timeout_s or Timeouts.lookup),
            )
        except (ValueError, InvalidRequest) as error:
            raise ConnectorConfigError(f"kv_connector_extra_config: {error}") from None
        return cls(
            target=_string(extra, "target"),
            namespace=namespace,
            options=options,
            prefill_tokens_per_s=_optional_positive(extra, "prefill_tokens_per_s"),
            prefill_fixed_s=_non_negative(extra, "prefill_fixed_s"),
            fetch_overhead_s=_non_negative(extra, "fetch_overhead_s"),
            fetch_bytes_per_s=_optional_positive(extra, "fetch_bytes_per_s"),
            remeasure_s=_non_negative(extra, "remeasure_s", DEFAULT_REMEASURE_S),
            pin_ttl_s=_non_negative(extra, "pin_ttl_s"),
            save_decoded=_boolean(extra, "save_decoded", True),
            save_during_forward=_boolean_or_auto(extra, "save_during_forward"),
            block_view=_boolean(extra, "block_view", False),
        )

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> ConnectorConfig:
        """`kv_connector_extra_config`, with the tensor-parallel shard taken from vLLM's
        own parallel config where there is one: vLLM hands every rank the same extra
        config, so a rank set there would be every rank's, and ranks holding different
        heads would store them under one namespace."""
        transfer = vllm_config.kv_transfer_config
        if transfer is None:
            raise ConnectorConfigError("vllm_config.kv_transfer_config is not set")
        extra = dict(transfer.kv_connector_extra_config or {})
        cache_block_size = getattr(getattr(vllm_config, "cache_config", None), "block_size", None)
        if isinstance(cache_block_size, int) and extra.get("block_size") != cache_block_size:
            raise ConnectorConfigError(
                f"kv_connector_extra_config.block_size is {extra.get('block_size')!r}, but "
                f"vLLM's blocks hold {cache_block_size} tokens (--block-size): they must be equal"
            )
        parallel = getattr(vllm_config, "parallel_config", None)
        tp_size = getattr(parallel, "tensor_parallel_size", None)
        if isinstance(tp_size, int) and tp_size >= 1:
            if "tp_rank" in extra or extra.get("tp_size", tp_size) != tp_size:
                raise ConnectorConfigError(
                    "kv_connector_extra_config: tp_rank and tp_size come from vLLM's "
                    f"parallel config (tensor_parallel_size={tp_size}), the same extra "
                    "config reaching every rank; remove them"
                )
            extra["tp_size"] = tp_size
            extra["tp_rank"] = _tensor_parallel_rank(parallel, tp_size)
        return cls.from_extra_config(extra)


def _tensor_parallel_rank(parallel: Any, tp_size: int) -> int:
    """This process's tensor-parallel rank: vLLM's parallel state in a worker, else (the
    scheduler's process, where no group is set up) the global rank's place in its TP group."""
    try:
        from vllm.distributed.parallel_state import (  # type: ignore[import-not-found]
            get_tensor_model_parallel_rank,
        )

        return int(get_tensor_model_parallel_rank())
    except (ImportError, AssertionError, AttributeError, RuntimeError):
        return int(getattr(parallel, "rank", 0) or 0) % tp_size


def _etcd(extra: dict[str, Any]) -> EtcdOptions | None:
    """The etcd_* keys over the KVSTORE_ETCD_* variables; None when no key is set, which
    leaves the cluster client to read the variables itself."""
    overrides = {field: _optional_string(extra, key) for key, field in _ETCD_KEYS.items()}
    if all(value is None for value in overrides.values()):
        return None
    return EtcdOptions.from_environment(overrides=overrides)


def _tls(extra: dict[str, Any]) -> TLSOptions | None:
    files = {
        "ca_file": _optional_string(extra, "tls_ca"),
        "cert_file": _optional_string(extra, "tls_cert"),
        "key_file": _optional_string(extra, "tls_key"),
        "server_name": _optional_string(extra, "tls_server_name"),
    }
    if all(value is None for value in files.values()):
        return None
    return TLSOptions(**files)


def _missing(key: str) -> ConnectorConfigError:
    return ConnectorConfigError(f"kv_connector_extra_config.{key} is required")


def _string(extra: dict[str, Any], key: str) -> str:
    value = extra.get(key)
    if value is None:
        raise _missing(key)
    if not isinstance(value, str) or not value:
        raise ConnectorConfigError(
            f"kv_connector_extra_config.{key} must be a non-empty string, got {value!r}"
        )
    return value


def _optional_string(extra: dict[str, Any], key: str) -> str | None:
    return None if extra.get(key) is None else _string(extra, key)


def _integer(extra: dict[str, Any], key: str, default: int | None = None) -> int:
    value = extra.get(key, default)
    if value is None:
        raise _missing(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConnectorConfigError(
            f"kv_connector_extra_config.{key} must be an integer, got {value!r}"
        )
    return value


def _number(extra: dict[str, Any], key: str) -> float | None:
    value = extra.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ConnectorConfigError(
            f"kv_connector_extra_config.{key} must be a number, got {value!r}"
        )
    return float(value)


def _optional_positive(extra: dict[str, Any], key: str) -> float | None:
    value = _number(extra, key)
    if value is not None and not 0 < value < float("inf"):
        raise ConnectorConfigError(f"kv_connector_extra_config.{key} must be > 0, got {value}")
    return value


def _non_negative(extra: dict[str, Any], key: str, default: float = 0.0) -> float:
    value = _number(extra, key)
    if value is None:
        return default
    if not 0 <= value < float("inf"):
        raise ConnectorConfigError(f"kv_connector_extra_config.{key} must be >= 0, got {value}")
    return value


def _boolean_or_auto(extra: dict[str, Any], key: str) -> bool | None:
    value = extra.get(key, "auto")
    if value == "auto":
        return None
    if not isinstance(value, bool):
        raise ConnectorConfigError(
            f'kv_connector_extra_config.{key} must be true, false or "auto", got {value!r}'
        )
    return value


def _boolean(extra: dict[str, Any], key: str, default: bool) -> bool:
    value = extra.get(key, default)
    if not isinstance(value, bool):
        raise ConnectorConfigError(
            f"kv_connector_extra_config.{key} must be true or false, got {value!r}"
        )
    return value
