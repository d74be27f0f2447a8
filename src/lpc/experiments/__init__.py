"""The experiments (experiments/README.md): the definition of an experiment's runs (``spec``, read from the ``sweep``
node of conf/experiment/NAME.yaml), the driver that runs them (``sweep``, lpc-sweep), the one reporter
(``report``, lpc-report; ``synthetic`` renders the synthetic benchmark's layout) and the resource planner (``plan``)."""
