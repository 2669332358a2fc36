"""Models: architectures, training, evaluation."""
