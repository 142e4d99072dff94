"""The `ember` command."""
