"""GEMM throughput of numpy (OpenBLAS) and torch on 2 threads, for the shapes of the training
benchmark's step. Compare with `cargo run --release -p inspector-qwen2vl --example gemm_probe`
(candle's CPU matmul, the `gemm` crate). Diagnostic only; see BENCHMARKS.md.

    OPENBLAS_NUM_THREADS=2 python tools/gemm_probe.py
"""
import time, numpy as np, torch
torch.set_num_threads(2)
shapes = [("qo fwd",1490,256,256),("kv fwd",1490,256,128),("gate/up fwd",1490,256,1024),("down fwd",1490,1024,256),
          ("down dX",1490,256,1024),("up dW",1024,1490,256),("attn QK",745,64,745),("attn PV",745,745,64)]
def bench(f, n=20):
    f(); t=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-t)/n
for name,m,k,n in shapes:
    a=np.random.rand(m,k).astype(np.float32); b=np.random.rand(k,n).astype(np.float32)
    ta=torch.from_numpy(a); tb=torch.from_numpy(b)
    tn=bench(lambda: a@b); tt=bench(lambda: ta@tb)
    fl=2*m*k*n
    print(f"{name:12s} {m}x{k}x{n}  numpy/openblas {fl/tn/1e9:6.1f} GFLOP/s  torch {fl/tt/1e9:6.1f} GFLOP/s")
