"""Presets: one YAML file per named preset (`lvd run --preset NAME`)."""
