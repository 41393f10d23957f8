"""rwcflow: RWCNet deformable registration of 3D brain MRI."""

import os

__version__ = "0.1.0"

# No network at run time: Pydra's Submitter and Nipype (on import in interactive sessions, on an
# interface's first run) ask a server for their newest release unless these are set. Compute nodes are
# often offline, and a pipeline must not phone home; set here, before anything of rwcflow imports either,
# as fMRIPrep does in its config.
for _variable in ("NO_ET", "NIPYPE_NO_ET"):
    os.environ.setdefault(_variable, "1")
