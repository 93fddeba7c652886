"""A module that exists but imports one that does not: ``load_app`` must not call it unknown."""

from __future__ import annotations

import importlib

importlib.import_module("cli_missing_dependency")

app = None
