"""rwcflow: RWCNet deformable registration of 3D brain MRI."""

__version__ = "0.1.0"
