"""Benchmarks of the transfer engine against nbdcopy and qemu-img, run side by side (bench/README.md)."""
