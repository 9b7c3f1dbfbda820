"""The models: config, the tensor-parallel layers, one file per model family, the fused CPU decode kernel."""
