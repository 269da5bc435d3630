"""Triton kernels and their launch wrappers. Imports nothing from tokenmill."""
