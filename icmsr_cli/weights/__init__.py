"""Where weights come from: the registry (weights.toml) and Hub downloads with pins."""
