"""Nearest-neighbour search by hardware: exact k-NN (a compiled voxel grid or SciPy's k-d tree on
the CPU, matrix products on the GPU) and soft nearest neighbours (dense reference, an O(N)-memory
attention kernel, and a certified truncation to nearby candidates)."""

from .nearest import KNN, MATMUL_CPU_MAX, NearestNeighborIndex, gather_points, knn
from .soft import ATTENTION_MIN_PAIRS, TRUNCATED_MIN_PAIRS, SoftMatch, soft_nearest

__all__ = [
    "KNN",
    "knn",
    "NearestNeighborIndex",
    "gather_points",
    "MATMUL_CPU_MAX",
    "SoftMatch",
    "soft_nearest",
    "ATTENTION_MIN_PAIRS",
    "TRUNCATED_MIN_PAIRS",
]
