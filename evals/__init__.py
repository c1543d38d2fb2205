"""``axiscap eval``: what capping changes, measured on a live endpoint."""
