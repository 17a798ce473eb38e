"""spear-jax: SPEAR, Dr.BoT, GRPO and GiGPO for LLM agents in JAX/Flax."""
