"""The upstream wing: everything that exists only to read, resume or imitate the reference code's files and flags
(marksgraham/ddpm-ood; shared/UPSTREAM.md), and the files of earlier ddpm-ood versions. The core calls it at its
edges (opening a run, resuming training, reading a results sidecar); nothing in it is needed for ddpm-ood's own
files.

- ``flags``: an upstream checkpoint's model from the flags, upstream's simplex noise, its "None" spellings.
- ``weights``: UNet weights with MONAI Generative key names; which flags an upstream checkpoint needs.
- ``legacy``: settings written before precision was named (``amp`` in sidecars and checkpoints).
"""
