"""The networks and their files: the encoder registry and U-Net (``unet``), losses, checkpoint
folders (``checkpoint``), safetensors weights files (``weights``).

May import ``io`` and ``config``; not ``data`` or any stage above.
"""
