"""Dashboard templates and static assets, served by the hub."""
