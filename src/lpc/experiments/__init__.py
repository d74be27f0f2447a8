"""The paper's experiments: the sweep driver (``sweep``), its report (``report``), the synthetic
benchmark's tables (``synthetic``), the published numbers they are compared with (``paper_numbers.yaml``)."""
