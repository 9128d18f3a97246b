"""fastmaskformer's fused loss in other code bases: ``integrations.transformers.use_fused(model)``."""
