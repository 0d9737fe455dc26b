"""The admin API: authenticated operator RPCs on their own listener (see docs/admin.md)."""
