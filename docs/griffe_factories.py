"""A Griffe extension for the API pages: the method factories are made at import time from each method's declared
knobs (``rigl = RigL.factory``), so reading the source finds an attribute; this extension asks the imported object
instead, so a factory's page shows its signature and docstring as Python reports them."""

from __future__ import annotations

import sys
from pathlib import Path

import griffe


class InspectFactories(griffe.Extension):
    """Replace each module attribute that is a method factory by the function Python sees at run time."""

    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs) -> None:
        value = attr.value
        if attr.parent is None or not str(value or "").endswith(".factory"):
            return
        root = Path(attr.filepath).parents[attr.module.path.count(".")]  # the folder the package sits in
        try:
            module = griffe.inspect(attr.module.path, filepath=attr.filepath, import_paths=[str(root), *sys.path])
        except ImportError as error:  # the package is not importable here: leave the attribute as read
            griffe.logger.warning(f"could not import {attr.module.path}: {error}")
            return
        inspected = module.members.get(attr.name)
        if inspected is not None:
            attr.parent.set_member(attr.name, inspected)
