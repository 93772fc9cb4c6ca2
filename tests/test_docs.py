"""The README and docs/ link only files that exist, and name only modules that import."""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "notebooks").glob("*.md")), ROOT / "benchmarks" / "README.md"]  # fmt: skip
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")  # [text](target) and ![alt](target)
MODULE = re.compile(r"`((?:llama_jax|experiments|benchmarks)(?:\.[a-z_0-9]+)+)")


def _links(path: pathlib.Path) -> list[str]:
  return [t for t in LINK.findall(path.read_text()) if "://" not in t]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(doc):
  missing = [t for t in _links(doc) if not (doc.parent / t).exists()]
  assert not missing, f"{doc.name} links files that do not exist: {missing}"


def _importable(dotted: str) -> bool:
  """`a.b.c` is a module, or an attribute of the longest importable prefix."""
  parts = dotted.split(".")
  for cut in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:cut]))
    except ModuleNotFoundError:
      continue
    for name in parts[cut:]:
      if not hasattr(obj, name):
        try:
          obj = importlib.import_module(f"{obj.__name__}.{name}")
        except (ModuleNotFoundError, AttributeError):
          return False
      else:
        obj = getattr(obj, name)
    return True
  return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_modules_exist(doc):
  names = sorted(set(MODULE.findall(doc.read_text())))
  missing = [n for n in names if not _importable(n)]
  assert not missing, f"{doc.name} names modules or objects that do not exist: {missing}"


def test_the_checks_catch_a_bad_link_and_name(tmp_path):
  doc = tmp_path / "x.md"
  doc.write_text("[a](nowhere.md) ![b](https://example.com/x.png)")
  assert _links(doc) == ["nowhere.md"]
  assert _importable("llama_jax.parallel.sharding.init_params")
  assert not _importable("llama_jax.sharding")
