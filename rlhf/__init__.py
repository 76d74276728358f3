"""RLHF training on DeepSpeed: SFT, reward model, PPO and DPO, configured with Hydra."""
