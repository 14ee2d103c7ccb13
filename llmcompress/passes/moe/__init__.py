"""The MoE family: `moe-prune` (expert pruning), `moe-skip` (interim dynamic expert skipping) and their algorithms."""
