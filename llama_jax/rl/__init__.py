"""The RL layer: rollouts from prompts, rewards (reward models, Llama 2's combination) and the
scorer signature over them, rejection sampling's best-of-K, and the online (PPO / GRPO) driver."""
