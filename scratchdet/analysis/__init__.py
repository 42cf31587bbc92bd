"""The analysis layer: studies of many runs (``study``), the report's figures and tables (``report``),
its findings (``findings``), paired bootstrap intervals (``bootstrap``) and saturating curve fits
(``curvefit``).  It reads run directories' ``metrics.jsonl`` (and ``config.yaml``); nothing of
training depends on it, so a reader learning how a model is trained can skip this package."""
