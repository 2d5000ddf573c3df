"""wavlink-jax: WavLink audio–text embeddings in JAX/Flax NNX."""
