"""diffcp: differentiable, batched Iterative Closest Point."""
