"""`python -m vidmoe ...` and `torchrun --nproc-per-node N -m vidmoe ...`: the `vidmoe` command."""

from vidmoe.cli import main

main()
