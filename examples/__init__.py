"""Configs and rubric datasets that ship with rubric_fast (package data, read with importlib.resources)."""
