"""Per-GPU figures the twin's roofline and fit check use, each with its source (vendor datasheets).

bf16/fp32: dense tensor-core peak FLOP/s without sparsity (fp32 = the non-tensor-core rate, what an fp32
matmul gets with TF32 off, torch's default). memory_mib: what `nvidia-smi` reports as total for the part.
link: per-GPU NVLink (or PCIe) bandwidth one direction, for the collective estimate.
"""
from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float
    fp32_flops: float
    hbm_bytes_per_s: float
    memory_mib: int
    multi_processors: int
    link_bytes_per_s: float
    source: str

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    def peak_flops(self, dtype) -> float:
        import torch

        return self.bf16_flops if dtype in (torch.bfloat16, torch.float16) else self.fp32_flops


_H100_SOURCE = "NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOP/s bf16 dense, 67 TFLOP/s fp32, 3.35 TB/s"
GPUS = {
    "h100": GPU("H100 SXM5 80GB", 989e12, 67e12, 3.35e12, 81559, 132, 450e9, _H100_SOURCE + ", NVLink 900 GB/s"),
    "h100-pcie": GPU("H100 PCIe 80GB", 756e12, 51e12, 2.0e12, 81559, 114, 64e9,
                     "NVIDIA H100 datasheet (PCIe): 756 TFLOP/s bf16 dense, 51 TFLOP/s fp32, 2.0 TB/s, PCIe Gen5"),
    "h200": GPU("H200 SXM 141GB", 989e12, 67e12, 4.8e12, 143771, 132, 450e9,
                "NVIDIA H200 datasheet (SXM): 989 TFLOP/s bf16 dense, 67 TFLOP/s fp32, 4.8 TB/s, NVLink 900 GB/s"),
    "a100-80gb": GPU("A100 SXM4 80GB", 312e12, 19.5e12, 2.039e12, 81920, 108, 300e9,
                     "NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOP/s bf16, 19.5 TFLOP/s fp32, 2,039 GB/s, "
                     "NVLink 600 GB/s"),
    "a100-40gb": GPU("A100 SXM4 40GB", 312e12, 19.5e12, 1.555e12, 40960, 108, 300e9,
                     "NVIDIA A100 datasheet (SXM4 40GB): 312 TFLOP/s bf16, 19.5 TFLOP/s fp32, 1,555 GB/s"),
    "l40s": GPU("L40S 48GB", 362e12, 91.6e12, 0.864e12, 46068, 142, 32e9,
                "NVIDIA L40S datasheet: 362 TFLOP/s bf16 dense, 91.6 TFLOP/s fp32, 864 GB/s, PCIe Gen4"),
}
