"""Emulated devices: the QEMU kit (`kit`) and guests that run the torch-free runtime as another CPU (`guest`)."""
