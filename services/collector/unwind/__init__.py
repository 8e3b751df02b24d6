"""Unwinding native stacks without frame pointers: tables from .eh_frame, walked in BPF.

eh_frame.py builds one compact table per ELF file; tables.py keeps them by build id (bounded)
and places them in the BPF row array; loader.py loads the tables of each sampled process into the
BPF maps and drops them when the process exits. docs/unwinding.md describes the whole.
"""
