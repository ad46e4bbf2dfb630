"""Run a bundle's ``multi_gpu_train.json`` on this rank, as ``monai.bundle run`` does, then gather what each rank holds.

Launched by ``tests/test_distributed.py`` under ``python -m torch.distributed.run``:
``ddp_worker.py RESULT_FILE JSON`` where JSON is ``{"config_file": [...], "override": {...}, "nan_at": [rank, it]}``.
On rank ``nan_at[0]`` the training loss of the first sample of iteration ``nan_at[1]`` is made NaN (the attack's loss
is left alone). A DDP communication hook counts the gradient all-reduce rounds. After the run, every rank's margin
table, the sample indices its ``DistributedSampler`` gave it in the last epoch, its all-reduce rounds and skipped
batches are gathered, and rank 0 saves them to ``RESULT_FILE``.
"""

import json
import math
import sys

import torch
import torch.distributed as dist
from monai.bundle import ConfigWorkflow
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks


def main(result_file: str, spec: str) -> None:
    spec = json.loads(spec)
    workflow = ConfigWorkflow(config_file=spec["config_file"], workflow_type=None, **spec["override"])
    workflow.initialize()
    rank = dist.get_rank()
    rounds = []

    def counting_allreduce(state, bucket):
        if bucket.is_last():
            rounds.append(1)
        return default_hooks.allreduce_hook(state, bucket)

    workflow.parser.get_parsed_content("network").register_comm_hook(None, counting_allreduce)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    loss = trainer.loss_function
    nan_rank, nan_iteration = spec["nan_at"]

    def loss_with_nan(pred, target):
        out = loss(pred, target)
        if rank == nan_rank and trainer.state.iteration == nan_iteration:
            out = torch.cat([out[:1] * math.nan, out[1:]])
        return out

    trainer.loss_function = loss_with_nan
    workflow.run()

    margins = workflow.parser.get_parsed_content("train#margins").margins
    tables = [torch.empty_like(margins) for _ in range(dist.get_world_size())]
    dist.all_gather(tables, margins)
    sampler = workflow.parser.get_parsed_content("train#sampler")
    sampler.set_epoch(workflow.parser.get_parsed_content("epochs"))
    mine = {"indices": list(sampler), "rounds": len(rounds), "skipped": trainer.state.skipped_batches}
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    if rank == 0:
        torch.save({"tables": tables, "ranks": ranks, "iterations": trainer.state.iteration}, result_file)
    workflow.finalize()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
