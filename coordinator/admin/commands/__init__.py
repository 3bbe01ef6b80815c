"""Every module in this package defines one admin command; importing the package
registers them all (tcctl builds its parser from the registry). Modules starting with ``_``
are helpers the commands import themselves — some only on the daemon side, so tcctl does not
pay for SQLAlchemy."""
import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
