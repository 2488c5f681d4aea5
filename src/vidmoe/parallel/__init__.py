"""Scale-out on torch.distributed: the process world, the parallel layout and its groups
(`world`), sequence and CFG parallel inference, expert-pipelined groups and distributed
training build on it. Nothing here starts a process group at import time."""
