"""LPIPS: the 2D and 2.5D perceptual distance (lpips) and its offline ImageNet AlexNet weights (weights)."""
