"""Model configurations (one YAML per model), shipped with the package as scalebio.model_configs."""
