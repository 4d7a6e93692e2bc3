"""Hardware probes, one module per kind of hardware, each reading through a system root.

Installed as `rpool_agent.probes` (see pyproject.toml). Probes import nothing from
`rpool_agent`; they return dataclasses and never print.

The records are plain `@dataclass(slots=True)`, not frozen: nothing changes a record once a
probe made it, and `frozen=True` doubles what defining each class costs (its methods are
generated when the module is imported), which every `rpool-agent detect` pays for the
dozen records on its path; see docs/detect.md, Speed.
"""
