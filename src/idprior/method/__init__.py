"""The method's parts: units, gates, spectral normalization, the identity prior, function norms, selection, the plan and its measures, FLOPs, compensation after the cut."""
