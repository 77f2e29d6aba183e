"""Imports every built-in callback module so each registers under its seed name."""

from __future__ import annotations
