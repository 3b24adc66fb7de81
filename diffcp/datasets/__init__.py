"""Datasets for the experiments: ModelNet40 in the official h5 layout and its registration protocols.

- :mod:`diffcp.datasets.modelnet40`: read the ``modelnet40_ply_hdf5_2048`` layout (train / val /
  test splits), download and verify the official zip;
- :mod:`diffcp.datasets.protocols`: DCP's and RPM-Net's ways of making registration pairs
  (clean, noisy as DCP's code does it and fixed, independent sampling, partial overlap, unseen
  categories);
- :mod:`diffcp.datasets.body_pairs`: depth-map pairs of a posed body (generated, with a manifest).
"""

from .modelnet40 import ModelNet40, default_folder, download_modelnet40, find_folder, load_modelnet40
from .protocols import PROTOCOLS, Protocol, RegistrationPair, RegistrationPairs, get_protocol, make_pair

__all__ = [
    "ModelNet40", "load_modelnet40", "find_folder", "default_folder", "download_modelnet40",
    "PROTOCOLS", "Protocol", "RegistrationPair", "RegistrationPairs", "get_protocol", "make_pair",
]
