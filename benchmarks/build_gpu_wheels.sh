#!/usr/bin/env bash
# Build the wheel folder that `python -m benchmarks.gpu_check --wheels` installs on the GPU image
# (Python 3.12, torch, triton, pytest, tokenizers; no deepspeed, megatron-core, pydantic or
# hjson, and no network). Run here, where the package registries are reachable; the
# versions are those installed in this environment, so the GPU runs the tested set.
#   bash benchmarks/build_gpu_wheels.sh [DIR]     (default benchmarks/gpu_wheels, ignored by git)
# Then carry DIR to the device and run, in the repository root:
#   python3 -m benchmarks.gpu_check --wheels DIR
set -euo pipefail
dir=${1:-benchmarks/gpu_wheels}
mkdir -p "$dir"
ver() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
# deepspeed as a pure-Python wheel: its C++/CUDA ops are built on first use (JIT), none here
DS_BUILD_OPS=0 python -m pip wheel --quiet --no-deps --no-build-isolation \
    "deepspeed==$(ver deepspeed)" -w "$dir"
# the rest as published cp312 manylinux wheels (pydantic-core is compiled). The image has
# typing-extensions, but no record says which version, and pydantic needs >= 4.14.1
# (pydantic-core imports typing_extensions.Sentinel): carry ours, which shadows it.
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$dir" \
    "megatron-core==$(ver megatron-core)" "pydantic==$(ver pydantic)" \
    "pydantic-core==$(ver pydantic-core)" "annotated-types==$(ver annotated-types)" \
    "typing-inspection==$(ver typing-inspection)" "hjson==$(ver hjson)" \
    "typing-extensions==$(ver typing-extensions)"
ls -l "$dir"
