"""The frozen target, at the bottom of the package graph: loading (embedded GGUF wheels, folders, Hub ids), its
forwards and features (model.py), and the CPU inference helpers (packing.py). Everything else imports it downward."""
