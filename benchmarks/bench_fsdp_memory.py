"""Per-rank memory of the sparse state under FSDP2 (CPU, gloo, 2 processes on loopback).

A timm model is sparsified, then sharded with ``fully_shard`` (every block, then the
root). Per rank: bytes of the sparse layers' sharded weights (the rank's shard), of
their masks and ``ever_active`` (replicated: whole on every rank), and what sharded
masks would take. Counted from tensor sizes (``numel · element_size``), not from the
allocator.

Run: python benchmarks/bench_fsdp_memory.py [--model resnet50] [--density 0.1]
"""

from __future__ import annotations

import argparse
import socket
import sys
from datetime import timedelta
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparse_param as sp  # noqa: E402

WORLD_SIZE = 2


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def worker(rank: int, port: int, model_name: str, density: float) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=120),
    )
    try:
        model = sp.sparsify(timm.create_model(model_name), density)
        blocks = [
            m
            for name, m in model.named_modules()
            if name.count(".") == 1 and "parametrizations" not in name
        ]
        for block in blocks:  # e.g. layer1.0 of a ResNet, blocks.0 of a ViT
            fully_shard(block)
        fully_shard(model)
        layers = list(sp.sparse_layers(model))
        weights = sum(nbytes(layer.weight.to_local()) for layer in layers)
        masks = sum(nbytes(layer.mask) + nbytes(layer.ever_active) for layer in layers)
        numel = sum(layer.numel for layer in layers)
        if rank == 0:
            print(
                f"{model_name}, density {density}, {WORLD_SIZE} ranks, {len(layers)} sparse "
                f"layers, {numel / 1e6:.1f} M weights"
            )
        dist.barrier()
        print(
            f"rank {rank}: sharded weights {weights / 2**20:.1f} MiB, masks + ever_active "
            f"(replicated) {masks / 2**20:.1f} MiB, sharded they would be "
            f"{masks / WORLD_SIZE / 2**20:.1f} MiB"
        )
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--density", type=float, default=0.1)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        worker, args=(port, args.model, args.density), nprocs=WORLD_SIZE, start_method="spawn"
    )


if __name__ == "__main__":
    main()
