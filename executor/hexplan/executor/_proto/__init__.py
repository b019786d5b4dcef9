"""Generated from proto/hexplan_v1.proto by proto/generate.py."""
