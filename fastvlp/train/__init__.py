"""Training: pre-training loop, optimiser and schedule, resumable sampler, checkpoints, distributed set-up."""
