"""A module that exists but imports a missing one whose name is a prefix of its own name
(``settings_local`` importing ``settings``): the error is about the missing module."""

from __future__ import annotations

import importlib

importlib.import_module("tests.apps.cli_settings")

app = None
