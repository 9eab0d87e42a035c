"""Test helpers: real external processes and scriptable fakes behind Shoal's Protocols."""
