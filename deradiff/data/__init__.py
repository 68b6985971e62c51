"""Preference data: Pick-a-Pic-schema loading and cleaning (`pickapic`), tiny-world preference
generation (`prefs`) and its config section (`config`), and the VAE-latent / text-embedding cache trainers
read from (`cache`)."""
