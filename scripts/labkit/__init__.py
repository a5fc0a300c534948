"""labkit: the machinery behind `scripts/lab` (QEMU guests booting real Debian kernels).

Never imported by the product package; tests reach it through scripts/lab or tests/lab.
"""
