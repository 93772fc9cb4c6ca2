"""The RL layer: the policy to sample from (`policy`), rollouts from prompts (`rollouts`),
scores of responses (`scorers`: reward models, Llama 2's combination in `rewards`, answer
checks), rejection sampling's best-of-K, and online RL: the iteration driver (`online`) and
the algorithms it runs, each built by one `build` (`ppo`; `grpo` with Dr. GRPO, RLOO and
REINFORCE++)."""
