"""The recipe: its schema and checks (schema.py), where recipes and data come from (sources.py), and the
reference generated from the schema (docs.py). The bottom layer: it imports nothing else of crb but its errors."""
