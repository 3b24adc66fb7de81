"""Test shapes with exact normals: surfaces sampled with trimesh (no symmetry unless asked)."""

import numpy as np
import torch
import trimesh


def _bumpy_sphere(seed: int = 0) -> trimesh.Trimesh:
    mesh = trimesh.creation.icosphere(subdivisions=3)
    v = mesh.vertices
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.1, 0.2, 3)
    r = 1 + a[0] * np.sin(3 * v[:, 0] + 1) * np.cos(2 * v[:, 1]) + a[1] * v[:, 2] ** 3 + a[2] * v[:, 0] * v[:, 1]
    return trimesh.Trimesh(v * r[:, None] * np.array([1.0, 0.7, 0.5]), mesh.faces)


SHAPES = {
    "bumpy_sphere": lambda: _bumpy_sphere(0),
    "bumpy_sphere_2": lambda: _bumpy_sphere(1),
    "box": lambda: trimesh.creation.box(extents=(1.0, 0.6, 0.35)),
    "torus": lambda: trimesh.creation.torus(major_radius=0.6, minor_radius=0.2),
    "capsule": lambda: trimesh.creation.capsule(height=1.0, radius=0.25),
}


def sample(shape: str, n: int, seed: int = 0, dtype=torch.float64):
    """``(points (n, 3), normals (n, 3))`` sampled uniformly on the surface of a named shape."""
    mesh = SHAPES[shape]()
    pts, face = trimesh.sample.sample_surface(mesh, n, seed=seed)
    normals = mesh.face_normals[face]
    return torch.as_tensor(np.asarray(pts), dtype=dtype), torch.as_tensor(np.asarray(normals), dtype=dtype)
