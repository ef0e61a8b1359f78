"""Platform kernels behind the mixers' `impl` switches: cuDNN and splash attention, fused Pallas (Triton / Mosaic) scans, and how a kernel sees sharded arrays."""
