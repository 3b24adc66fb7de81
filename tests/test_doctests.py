"""Every docstring example in the library runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest
import torch

import diffcp

MODULES = sorted(m.name for m in pkgutil.walk_packages(diffcp.__path__, prefix="diffcp."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"torch": torch, "diffcp": diffcp}, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
