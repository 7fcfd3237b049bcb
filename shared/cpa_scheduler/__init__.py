"""CPA Scheduler core: the agent protocol, task graphs, planning, dispatch and the data layer.

Nothing in this package imports a web framework; `functions/` composes it.
"""

__version__ = "0.1.0"
