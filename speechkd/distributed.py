"""The processes of a multi-process run: which one this is, waiting for the others, starting them on one node.

speechkd runs data-parallel the way Lightning and torchrun do: every process runs the same pipeline (SPMD). A fit
trains with Lightning's DDP (each rank on its own batches); a labelling stage splits the cuts by rank; any other
stage (prepare, evaluate, report) runs on global rank 0 while the other ranks wait at a barrier. Nothing here
trains or reduces anything: the launcher (torchrun, SLURM's srun) starts the processes and sets the variables
Lightning's cluster environments read (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, or ``SLURM_PROCID``/``SLURM_NTASKS``);
this module reads them through those same Lightning classes, joins the processes into one ``torch.distributed``
group before the first stage (Lightning's DDP then reuses it), and gives the pipeline a barrier.

On one node ``speechkd run`` starts the processes itself with ``torch.distributed.run`` when the recipe's
``runtime`` asks for more than one (:func:`relaunch_if_needed`).
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Optional, Sequence

#: How long a rank waits at a pipeline barrier for rank 0 (a prepare stage over a large corpus may take hours).
STAGE_TIMEOUT = datetime.timedelta(days=7)
#: Timeout of the default process group's collectives (DDP's gradient all-reduce): Lightning's default.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)

_stage_group = None


def _cluster_environment():
    """Lightning's cluster environment of this process when a launcher started it (torchrun/TorchElastic or SLURM
    with several tasks), else None."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment()
    if SLURMEnvironment.detect() and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return SLURMEnvironment()
    return None


def launched_world() -> tuple[int, int]:
    """``(global rank, world size)`` of this process as its launcher set them; ``(0, 1)`` when not launched."""
    env = _cluster_environment()
    if env is None:
        return 0, 1
    return env.global_rank(), env.world_size()


def rank() -> int:
    """Global rank of this process (0 in a single-process run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return launched_world()[0]


def world_size() -> int:
    """Processes of the run (1 in a single-process run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return launched_world()[1]


def is_main() -> bool:
    """This is global rank 0 (the process that writes shared outputs)."""
    return rank() == 0


def init_distributed(use_gpu: bool) -> bool:
    """Join the launched processes into the default ``torch.distributed`` group (NCCL on GPUs, gloo on CPUs) plus a
    gloo group with a long timeout for the pipeline's barriers. A no-op in a single process or when the group exists.

    Lightning's DDP strategy finds the group initialised and uses it. On GPUs each process is first bound to the
    device of its local rank.

    Returns:
      True when this is a multi-process run (the group exists after the call).

    Raises:
      RuntimeError: the launcher's variables are inconsistent (from torch.distributed).
    """
    global _stage_group
    import torch
    import torch.distributed as dist

    env = _cluster_environment()
    if env is None or env.world_size() <= 1:
        return False
    if not dist.is_initialized():
        os.environ["MASTER_ADDR"] = env.main_address  # torchrun sets these already; SLURM's are derived by Lightning
        os.environ["MASTER_PORT"] = str(env.main_port)
        if use_gpu:
            torch.cuda.set_device(env.local_rank())
        dist.init_process_group("nccl" if use_gpu else "gloo", rank=env.global_rank(), world_size=env.world_size(),
                                timeout=COLLECTIVE_TIMEOUT)
    if _stage_group is None:
        _stage_group = dist.new_group(backend="gloo", timeout=STAGE_TIMEOUT)
    return True


def barrier() -> None:
    """Wait until every process reaches this point (a no-op in a single-process run)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    dist.barrier(group=_stage_group)


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The command that runs ``speechkd <argv>`` in ``nproc`` processes on this node with ``torch.distributed.run``
    (torchrun; a standalone rendezvous on a free local port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc-per-node={nproc}",
            "-m", "speechkd.cli", *argv]


def relaunch_if_needed(runtime, argv: Optional[Sequence[str]] = None) -> None:
    """Replace this process by torchrun starting ``runtime.processes_per_node()`` copies of the same command when the
    runtime asks for several processes on one node and no launcher started this one; return otherwise.

    Args:
      runtime: the recipe's :class:`speechkd.config.RuntimeConfig`.
      argv: the command's arguments after ``speechkd`` (default ``sys.argv[1:]``).

    Raises:
      RuntimeError: ``runtime.num_nodes > 1`` without a launcher (several nodes are started by torchrun on each node
        or by SLURM's srun: see docs/scale_out.md), or a launcher started a different number of processes than the
        runtime asks for.
    """
    rank_, world = launched_world()
    wanted = runtime.world_size()
    if world > 1 or os.environ.get("TORCHELASTIC_RUN_ID"):
        if world != wanted:
            raise RuntimeError(f"the launcher started {world} processes but the recipe's runtime asks for {wanted} "
                               f"(devices {runtime.devices} x num_nodes {runtime.num_nodes}): make them agree")
        return
    if wanted == 1:
        return
    if runtime.num_nodes > 1:
        raise RuntimeError(f"runtime.num_nodes is {runtime.num_nodes}: start the processes on every node with torchrun "
                           "or SLURM's srun (docs/scale_out.md); speechkd starts them itself on one node only")
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = torchrun_command(runtime.processes_per_node(), argv)
    print(f"speechkd: starting {runtime.processes_per_node()} processes: {' '.join(cmd)}", file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)
