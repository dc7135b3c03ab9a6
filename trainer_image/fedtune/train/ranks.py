"""A party's data-parallel ranks: how many run, launching them, and what rank 0 shares with the others.

A party that trains with N > 1 ranks (`parties[].ranks`, or `resources.gpu: N`) runs as N
processes: its command (`fedtune label-trainer ...`, the same under `fedtune run` and in a pod)
checks the devices and then replaces itself with torchrun, which starts the command N times with
RANK / WORLD_SIZE / LOCAL_RANK set. Every rank loads the model and the data; transformers'
Trainer trains data-parallel (DistributedDataParallel: NCCL on GPUs, gloo on the CPU), each rank
on its share of every global batch.

Only rank 0 talks to the federation (scheduler, aggregator, key agreement) and writes
checkpoints. The others take from it what they need, over a gloo group of their own: the shared
configuration after Join, and the global adapter at round 0 and after every aggregation. They
wait there while rank 0 waits for the other parties, for as long as the federation takes: its
own deadlines (`aggregation.round_timeout_s`, connection deadlines) bound that wait, and a rank
that dies takes the others down through torchrun, so that group's timeout is only a backstop.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from fedtune import procctl
from fedtune.model.adapters import adapter_schema, adapter_state, load_adapter_state
from fedtune.roles import TORCH_THREADS_ENV
from fedtune.spec import JobSpec, Party, SpecError

AGENT_ENV = "FEDTUNE_RANKS_AGENT"  # pid of the torchrun agent a rank belongs to
# Training collectives: ranks step together; rank 0 may spend up to its connection deadline
# reporting to a restarting scheduler between two steps.
TRAINING_TIMEOUT = timedelta(hours=1)
FEDERATION_TIMEOUT = timedelta(days=7)


def launched() -> bool:
    """Whether this process is one of a party's ranks (started by torchrun)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def uses_cuda(spec: JobSpec, party: Party) -> bool:
    return not spec.trainer_args(party).get("no_cuda") and torch.cuda.is_available()


def check_devices(spec: JobSpec, party: Party) -> None:
    """More ranks than devices, or GPUs asked for where training runs on the CPU: refused, naming the field."""
    count = spec.ranks(party)
    if count <= 1:
        return
    field = spec.ranks_field(party)
    if uses_cuda(spec, party):
        devices = torch.cuda.device_count()
        if count > devices:
            raise SpecError(f"{field}: {count} ranks but party `{party.name}` sees {devices} CUDA devices")
    elif party.ranks is None:
        why = "trainer.no_cuda is set" if spec.trainer_args(party).get("no_cuda") else "this machine has no CUDA device"
        raise SpecError(f"{field}: {count} GPUs asked for but party `{party.name}` trains on the CPU ({why}); "
                        f"set spec.parties[{spec.parties.index(party)}].ranks for gloo ranks on the CPU")


def relaunch(count: int, argv: list[str]) -> NoReturn:
    """Replace this process with torchrun starting `fedtune ARGV` as `count` ranks (same pid: signals reach it)."""
    env = dict(os.environ)
    env[AGENT_ENV] = str(os.getpid())
    # The party's CPU share is split among its ranks.
    threads = max(1, int(env.get(TORCH_THREADS_ENV) or os.cpu_count() or 1) // count)
    env[TORCH_THREADS_ENV] = env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={count}",
               "-m", "fedtune", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, env)


def _die_with_agent() -> None:
    """torchrun starts each rank in a session of its own: a SIGKILL of the agent would leave the ranks
    running, still holding the party's place in the federation. Tie each rank's life to the agent's."""
    agent = os.environ.get(AGENT_ENV)
    if agent is not None:
        procctl.die_with_parent(signal.SIGKILL, int(agent))


@dataclass(frozen=True)
class Ranks:
    """This process's place among its party's ranks."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Any = None  # the gloo group rank 0 shares federation results over

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (any picklable object)."""
        if self.world == 1:
            return value
        box = [value if self.leader else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def share_adapter(self, model: Any) -> None:
        """Every rank's adapter becomes rank 0's, in place (the optimizer keeps its tensors)."""
        if self.world == 1:
            return
        schema = adapter_schema(model)
        sizes = [math.prod(shape) for _, shape in schema]
        if self.leader:
            flat = torch.cat([t.reshape(-1) for t in adapter_state(model).values()])
        else:
            flat = torch.empty(sum(sizes), dtype=torch.float32)
        dist.broadcast(flat, src=0, group=self.group)
        if not self.leader:
            chunks = flat.split(sizes)
            load_adapter_state(model, {name: chunk.view(shape) for (name, shape), chunk in zip(schema, chunks)})


def start(spec: JobSpec, party: Party) -> Ranks:
    """Join this party's ranks (a single process is rank 0 of 1)."""
    if not launched():
        return Ranks()
    world = int(os.environ["WORLD_SIZE"])
    if world != spec.ranks(party):
        raise SpecError(f"{spec.ranks_field(party)}: party `{party.name}` has {spec.ranks(party)} ranks but was "
                        f"started as {world}")
    _die_with_agent()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    cuda = uses_cuda(spec, party)
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TRAINING_TIMEOUT)
    group = dist.new_group(backend="gloo", timeout=FEDERATION_TIMEOUT)
    return Ranks(rank=rank, world=world, local_rank=local_rank, group=group)
