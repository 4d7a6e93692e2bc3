"""Hardware probes, one module per kind of hardware, each reading through a system root.

Installed as `rpool_agent.probes` (see pyproject.toml). Probes import nothing from
`rpool_agent`; they return frozen dataclasses and never print.
"""
