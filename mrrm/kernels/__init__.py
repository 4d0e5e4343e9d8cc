"""Triton kernels of mrrm, installed as the subpackage `mrrm.kernels`.

Each file holds one op's kernels, their launchers and its torch.autograd.Function:
    varlen_attention.py   flash-attention forward/backward over a packed stream (causal,
                          bidirectional, shared_prefix with key-block skipping), GQA
    value_head.py         gather of the score rows fused into the value head's first GEMM
"""
