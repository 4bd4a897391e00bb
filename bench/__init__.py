"""Benchmarks of the transfer engine beside nbdcopy and qemu-img, in one run (bench/README.md)."""
