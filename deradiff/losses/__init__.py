"""Pure loss math (no accelerate, no pipelines): Diffusion-DPO here; DDPO in `ddpo`."""
