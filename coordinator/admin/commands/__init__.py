"""Every module in this package defines one admin command; importing the package
registers them all (tcctl builds its parser from the registry)."""
import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
