"""Fusion passes (one module per kind): folds into weights, sibling linears, matmul epilogues, generated pointwise
kernels. Importing a module registers its pass."""
