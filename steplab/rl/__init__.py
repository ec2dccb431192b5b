"""Reasoning RL (Open-Reasoner-Zero PPO and the GRPO family) with rollouts through the serving engine."""
