"""(skeleton) The pytest plugin: filled in by its own change."""
