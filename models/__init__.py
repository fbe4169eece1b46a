"""Networks, datasets over de-identified DICOM, and the training and evaluation loops.

Plain PyTorch/Opacus/MONAI code that tests call without Flower.
"""
