"""Agent Hub's agent: collects host events, spools them to disk and streams them to the hub.

Kept import-light on purpose: the modules are `spool`, `collectors`, `replay`, `session`,
`commands`, `tls`, `wire` and `cli`; import what you use from them.
"""

__version__ = "0.1.0"
