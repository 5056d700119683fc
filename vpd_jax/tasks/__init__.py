"""What differs between tasks, behind one interface (base.Task): VPD segmentation, depth and referring
segmentation (vpd.py), LD-ZNet (ldznet.py) and the feature probes (probe.py); registry.py names them."""
