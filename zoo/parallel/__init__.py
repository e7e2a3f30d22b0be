"""Parallelism beyond one process, on torch.distributed: context parallelism (the sequence split
across ranks) for every sequence mixer, expert parallelism for the MoE channel mixer, FSDP2 and
the device mesh that holds them. Nothing here launches processes or talks to the network itself:
`accelerate launch` (or torchrun) starts the ranks, torch.distributed carries the tensors.
"""
