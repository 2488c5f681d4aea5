"""Scale-out on torch.distributed: the process world, the parallel layout and its groups
(`world`), Ulysses sequence parallelism (`ulysses`) and CFG parallelism (`cfg`) for inference
(`Pipeline.set_parallel`; usage in docs/distributed.md); expert-pipelined groups and distributed
training build on it. Nothing here starts a process group at import time."""
