"""MLflow runs, tags, registry access and logged figures: how stages record what they did."""
