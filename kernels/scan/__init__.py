from kernels.scan.reference import scan_reference

__all__ = ["scan_reference"]
