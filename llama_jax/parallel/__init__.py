"""Parallelism and compilation: device meshes (data, fsdp, tensor), the logical-axis table,
sharded initialization, device descriptions of chips this host lacks, and ahead-of-time
compile-and-fit."""
