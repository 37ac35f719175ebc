"""RL fine-tuning pieces: offline models and tokenizers, verifiable-reward tasks, SFT and GRPO losses,
and the training job split in three: config (TrainConfig, the recipe), build (device, backend,
optimizer, transport, hooks) and trainer (the loop).

Imports transformers and omegaconf (the `rl` extra) only when these modules are used.
"""
