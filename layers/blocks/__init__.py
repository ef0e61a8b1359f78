"""The building blocks every family composes: projections, norms, MLPs, RoPE, the model ends, the residual block and the mixer protocol, layer stacks, decode caches."""
