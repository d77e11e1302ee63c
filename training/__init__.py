"""Training and data-building scripts for retrv-r1-plugin (not part of the installed package)."""
