"""Pure, jit-able RL objectives: advantages, policy losses, aggregation, token statistics."""
