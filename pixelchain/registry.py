"""A registry of named model classes; the density models and the classifiers each keep one.

Each family lives in its own module of the registry's package and registers its classes when
imported (``@REGISTRY.register("name")``); the registry imports every family before answering.
"""

from __future__ import annotations

import inspect
from importlib import import_module
from typing import Any

import torch

from .runtime import check_fits


class Registry:
    """Names -> classes of one ``kind`` ('model', 'classifier'), built from ``families`` of ``package``.
    ``fixed`` names the constructor arguments every class takes (not hyperparameters)."""

    def __init__(self, kind: str, package: str, families: list[str], fixed: tuple[str, ...]) -> None:
        self.kind, self.package, self.families, self.fixed = kind, package, families, fixed
        self.classes: dict[str, type] = {}

    def register(self, name: str):
        """Class decorator: make a class available to ``create`` (and checkpoints) as ``name``."""

        def add(cls):
            if name in self.classes:
                raise ValueError(f"{self.kind} name {name!r} registered twice")
            cls.name = name
            self.classes[name] = cls
            return cls

        return add

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._import_families()
        return sorted(self.classes)

    def create(self, name: str, **args: Any):
        """Build ``name`` from its fixed arguments and hyperparameters; ValueError naming an unknown
        name or hyperparameter."""
        self._import_families()
        if name not in self.classes:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self.classes))}")
        cls = self.classes[name]
        if hasattr(cls, "variant"):  # a name whose arguments choose the class (made, num_masks=M: the ensemble)
            name, args = cls.variant(args)
            cls = self.classes[name]
        known = [p for p in inspect.signature(cls.__init__).parameters if p != "self" and p not in self.fixed]
        unknown = sorted(set(args) - set(known) - set(self.fixed))
        if unknown:
            raise ValueError(f"{name} has no hyperparameter {', '.join(unknown)}; its hyperparameters are {known}")
        with torch.device("meta"):  # its size first, without allocating it
            meta = cls(**args)
        nbytes = sum(t.numel() * t.element_size() for t in [*meta.parameters(), *meta.buffers()])
        shown = ", ".join(f"{k}={v!r}" for k, v in args.items() if k not in self.fixed)
        check_fits(nbytes, f"{name}({shown})")
        return cls(**args)

    def hyperparameters(self, name: str) -> dict[str, Any]:
        """``name``'s hyperparameters and their defaults (``inspect.Parameter.empty`` where none)."""
        self._import_families()
        if name not in self.classes:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self.classes))}")
        parameters = inspect.signature(self.classes[name].__init__).parameters.values()
        return {p.name: p.default for p in parameters if p.name != "self" and p.name not in self.fixed}

    def describe(self, name: str) -> str:
        """``name``'s summary (the first paragraph of its docstring) and hyperparameters with defaults."""
        doc = " ".join((inspect.getdoc(self.classes[name]) or "").split("\n\n")[0].split())
        lines = [f"{name}: {doc}" if doc else name]
        for key, default in self.hyperparameters(name).items():
            lines.append(f"  {key} = {'(required)' if default is inspect.Parameter.empty else repr(default)}")
        return "\n".join(lines)

    def _import_families(self) -> None:
        for family in self.families:
            import_module(f"{self.package}.{family}")
