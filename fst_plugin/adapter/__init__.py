"""Thin adapters to BackdoorBench (none of its code): its defense base class, loaders, transforms and model factory."""
