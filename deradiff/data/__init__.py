"""Preference data: Pick-a-Pic-schema loading and cleaning (`pickapic`), tiny-world preference
generation (`prefs`), and the VAE-latent / text-embedding cache trainers read from (`cache`)."""
