#!/usr/bin/env bash
# The vLLM connector against a real vLLM's KVConnectorBase_V1, on a CPU-only machine:
# a scratch venv over this interpreter's packages (torch stays the CPU wheel), vLLM's
# wheel without its dependencies, then only the packages importing its connector base
# needs; then the connector's tests, which no longer skip the check that the class
# subclasses the real base, leaves no abstract method and takes the base's parameters.
#
#   bash bench/vllm_contract.sh              # from anywhere; VLLM_VERSION=0.33.0 by default
#
# It downloads about 340 MB (vLLM's wheel). Exit status: the tests' (0: all passed).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
VLLM_VERSION="${VLLM_VERSION:-0.33.0}"
VENV="${VLLM_CONTRACT_VENV:-${TMPDIR:-/tmp}/kvstore-vllm-contract}"
cd "$(dirname "$0")/.."

# What `import vllm.distributed.kv_transfer.kv_connector.v1.base` needs beyond torch,
# numpy and this project's own dependencies (found for vLLM 0.33.0).
IMPORT_DEPS=(
    psutil pyzmq transformers huggingface_hub tqdm httpx2 httpcore2 truststore h11
    "safetensors>=0.8.0" tokenizers regex cbor2 aiohttp multidict yarl propcache
    aiohappyeyeballs aiosignal frozenlist openai_harmony openai anyio pybase64 cachetools
    msgspec uvloop xgrammar apache-tvm-ffi fastapi starlette annotated_doc typing_extensions
    opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions importlib_metadata
    zipp deprecated wrapt partial_json_parser llguidance
)

"$PYTHON" -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install -q --no-deps "vllm==$VLLM_VERSION"
"$VENV/bin/pip" install -q --no-deps -U "${IMPORT_DEPS[@]}"
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/python" -c 'import vllm; print("vllm", vllm.__version__)'
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/client/test_vllm_connector.py -rs
