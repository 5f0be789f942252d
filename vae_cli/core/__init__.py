"""The bottom layer: errors and exit codes, atomic files, the registry helper, the recipe schema, the
stderr reporter and the device/precision runtime. It imports nothing else from vae_cli."""
