"""Images: safe decoding on the device, the verifier's preprocessing, image prompts and upload modes.

Nothing here imports torch at module level: the device tier decodes and preprocesses images with
Pillow and numpy alone, and only the engines turn pixels into tensors.
"""
