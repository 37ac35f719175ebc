"""RL fine-tuning pieces: offline models and tokenizers, verifiable-reward tasks, SFT and GRPO losses.

Imports transformers (the `rl` extra) only when these modules are used.
"""
