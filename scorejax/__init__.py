"""scorejax: score-based generative modeling through SDEs, in JAX/Flax."""
