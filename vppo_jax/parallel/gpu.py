"""NVIDIA GPU devices without a GPU: XLA's GPU compiler on a described target, for compiling only.

    devices = gpu.topology_devices("8xh100")   # 8 H100 devices, or None without JAX's CUDA plugin
    mesh = sharding.make_mesh(config.mesh, devices=devices)

JAX's CUDA plugin (jax-cuda12-plugin, in requirements-gpu.txt) makes a compile-only topology
from a target description (XLA's GpuTargetConfigProto: the chip's limits, memory and compute
capability) instead of probing a device; XLA then optimizes, fuses and assigns buffers as
for the real GPU. The plugin checks the CUDA libraries' versions when it loads, which
needs them installed: `topology_devices` skips that check (nothing runs on a GPU here). It
gives no cost analysis (no time); hlo_cost counts the program's cuBLAS matmuls.
"""

from __future__ import annotations

import importlib.util
import os

# An H100 SXM 80 GB (compute capability 9.0, 132 SMs), as XLA's GPU compiler reads it.
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability { major: 9 }
}
platform_name: "CUDA"
runtime_version { major: 12 minor: 8 }
dnn_version_info { major: 9 minor: 7 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
TARGETS = {"h100": H100_TARGET}


def cuda_plugin_installed() -> bool:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None


def topology_devices(kind: str, count: int) -> list | None:
    """`count` compile-only GPUs of `kind` (h100) on one host, or None without the CUDA plugin."""
    if not cuda_plugin_installed():
        return None
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # before JAX loads its plugins
    # Without a GPU nothing is autotuned, and some of the update's Triton matmul fusions then
    # find no tiling ("Couldn't find output tile sizes"): matmuls are compiled as cuBLAS calls
    # instead (a GPU run may pick Triton for some after autotuning; the buffers are the same).
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_enable_triton_gemm" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_enable_triton_gemm=false".strip()
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(kind, "cuda", target_config=TARGETS[kind], topology=f"1x1x{count}").devices
    if len(devices) != count:
        raise RuntimeError(f"the CUDA plugin made {len(devices)} devices for {count}x{kind}.")
    return list(devices)
