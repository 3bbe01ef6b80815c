"""Runtime drivers (SPEC §9): the interface, the ``none`` driver and the QEMU microVM driver."""
from .driver import NoneDriver, RuntimeDriver, VmSpec, VmStatus, make_driver

__all__ = ["NoneDriver", "RuntimeDriver", "VmSpec", "VmStatus", "make_driver"]
