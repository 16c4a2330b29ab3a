"""Thin adapters to BackdoorBench: its defense base class, loaders, transforms and model factory."""
