"""dreamguide inside other libraries' pipelines.

    dreamguide.integrations.diffusers   ConsistencyGuidance, a guider for diffusers' modular SDXL pipeline

Each module imports the library it integrates with at import time and checks the version it
was written against; nothing here is imported by ``import dreamguide``.
"""
