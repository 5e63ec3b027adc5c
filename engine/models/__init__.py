"""Reference PyTorch models of every stage of the cascade, state-dict compatible with diffusers/transformers."""
