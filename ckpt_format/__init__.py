"""Ember checkpoint format (version 1): spec constants, index model, writer (convert) and reference reader."""
