"""Models: loading a base model (demo, local folder, hub id), discovering its MoE layout per family, devices and
dtypes, and the config-only limit checks run before any weight loads."""
