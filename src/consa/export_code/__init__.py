"""Code shipped inside head-wise exports (copied next to config.json, named in its ``auto_map``)."""
