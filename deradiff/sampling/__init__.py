"""Denoising loops that need more than a pipeline call (DDIM with per-step log-probs for DDPO)."""
