#!/usr/bin/env bash
# Builds the GPU bundle on a machine without a GPU or a CUDA installation: nvcc and the CUDA
# headers come from NVIDIA's PyPI wheels (../shared/CUDA_BUILD.md), the kernels are compiled
# for one compute capability, and everything the GPU check runs is packed into one compressed
# file that the `device` tool carries to the GPU machine (at most 64 MiB):
#
#   target/gpu-bundle.tar.xz
#     bin/inspector        the CLI with the `cuda` feature
#     tests/*              the device-parameterised test binaries (their `_cuda` instances)
#     bench/gpu            the GPU benchmark (crates/cli/benches/gpu.rs)
#     wheels/*             PEFT and accelerate, for the reference side
#     BUILD_ROOT           where the tests were built (they find their fixtures there)
#
# candle-core is vendored with its CUDA libraries loaded at run time (cudarc's dynamic
# loading), so nothing CUDA is linked dynamically (the CUDA runtime candle-kernels asks for is
# linked statically): no driver stub is needed here, and the binaries start on a machine
# without the driver and say so. At run time they need the driver's libcuda.so.1 and
# CUDA 13's libcublas, libcublasLt, libcurand and libnvrtc on the library path (the GPU
# machine's /usr/local/cuda/lib64, or the same PyPI wheels).
#
# Usage: tools/gpu/build.sh            (CUDA_COMPUTE_CAP=90: H100 and H200)
# Env:   CUDA_COMPUTE_CAP, CUDA_TOOLKIT_DIR (default target/cuda-toolkit), PYTHON (for pip).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
toolkit=${CUDA_TOOLKIT_DIR:-$root/target/cuda-toolkit}
cap=${CUDA_COMPUTE_CAP:-90}
python=${PYTHON:-python3}

# 1. The toolkit. nvcc 13.0 matches the GPU machine's driver (580, CUDA 13.0): a newer nvcc
#    writes PTX that the driver cannot load.
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
if [[ ! -x $toolkit/nvidia/cu13/bin/nvcc ]]; then
    echo "fetching the CUDA 13.0 compiler from PyPI into $toolkit"
    mkdir -p "$toolkit/wheels"
    "$python" -m pip download --quiet --no-deps -d "$toolkit/wheels" "${wheels[@]}"
    for w in "$toolkit"/wheels/*.whl; do
        "$python" -m zipfile -e "$w" "$toolkit"
    done
    chmod +x "$toolkit"/nvidia/cu13/bin/* "$toolkit"/nvidia/cu13/nvvm/bin/*
fi
cuda=$toolkit/nvidia/cu13
export CUDA_HOME=$cuda CUDA_ROOT=$cuda CUDA_PATH=$cuda CUDA_COMPUTE_CAP=$cap
export PATH=$cuda/bin:$PATH
nvcc --version | tail -1
# candle-kernels links its MoE kernels against the CUDA runtime (`-lcudart`). A linker script
# in place of libcudart.so takes the static runtime instead, so the binaries need no libcudart
# at run time (the static runtime opens the driver itself). The C compiler driver passes
# LIBRARY_PATH to the linker, and cargo does not fingerprint it.
mkdir -p "$toolkit/link"
echo "INPUT($cuda/lib/libcudart_static.a)" > "$toolkit/link/libcudart.so"
export LIBRARY_PATH=$toolkit/link${LIBRARY_PATH:+:$LIBRARY_PATH}

# 2. The build, in its own target folder so that the CPU build's stays as it is.
export CARGO_TARGET_DIR=$root/target/cuda
features=(--features inspector-cli/cuda,inspector-train/cuda,inspector-qwen2vl/cuda)
tests=(-p inspector-qwen2vl --test parity -p inspector-train --test gradients
       -p inspector-cli --test device_cli)
echo "building the CLI, the GPU tests and the benchmark (CUDA, compute capability $cap)"
cargo build --release --locked -p inspector-cli "${features[@]}"
cargo test --release --locked --no-run "${tests[@]}" "${features[@]}" \
    --message-format=json-render-diagnostics > "$CARGO_TARGET_DIR/tests.json"
cargo bench --locked --no-run -p inspector-cli --bench gpu "${features[@]}" \
    --message-format=json-render-diagnostics > "$CARGO_TARGET_DIR/bench.json"

# 3. The bundle: stripped binaries, named by test target.
stage=$CARGO_TARGET_DIR/gpu-bundle
rm -rf "$stage" && mkdir -p "$stage/bin" "$stage/tests" "$stage/bench"
cp "$CARGO_TARGET_DIR/release/inspector" "$stage/bin/"
"$python" - "$CARGO_TARGET_DIR" "$stage" <<'PY'
import json, shutil, sys
target, stage = sys.argv[1], sys.argv[2]
for name, sub in (("tests.json", "tests"), ("bench.json", "bench")):
    for line in open(f"{target}/{name}"):
        m = json.loads(line)
        if m.get("reason") == "compiler-artifact" and m.get("executable") \
                and m["target"]["kind"] in (["test"], ["bench"]):
            shutil.copy(m["executable"], f"{stage}/{sub}/{m['target']['name']}")
PY
strip "$stage"/bin/* "$stage"/tests/* "$stage"/bench/*
# The tests find their fixtures under the path they were built in; check.sh links it.
echo "$root" > "$stage/BUILD_ROOT"
# PEFT and accelerate (pure Python) for a GPU machine whose Python lacks them: it has no
# registry access.
mkdir -p "$stage/wheels"
"$python" -m pip download --quiet --no-deps -d "$stage/wheels" peft==0.21.2 accelerate
tar -C "$stage" -cf - . | xz -T2 -6 > "$root/target/gpu-bundle.tar.xz.tmp"
mv "$root/target/gpu-bundle.tar.xz.tmp" "$root/target/gpu-bundle.tar.xz"
ls -l "$root/target/gpu-bundle.tar.xz"
size=$(stat -c %s "$root/target/gpu-bundle.tar.xz")
if (( size > 60 * 1024 * 1024 )); then
    echo "the bundle is over 60 MiB: the device tool carries 64 MiB in all" >&2
    exit 1
fi
echo "carry it with: run(carry=[\"target/gpu-bundle.tar.xz\"], command=\"tools/gpu/check.sh\")"
