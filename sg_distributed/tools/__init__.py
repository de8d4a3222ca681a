"""Command-line tools: export, presets, memory estimate."""
