"""Test stand-in for the EVAR package (see tests/evar_stub/README.md)."""
