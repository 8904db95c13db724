"""CUDA kernels (``@cuda.jit``) and their launch code; imported only for CUDA inputs."""
