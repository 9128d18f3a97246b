"""Fused backends. Each module registers its backends with the ops when imported by
``fastmaskformer.ops._dispatch.load_backends``; nothing here is imported eagerly."""
