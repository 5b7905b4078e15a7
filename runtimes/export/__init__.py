"""Export of bundles to other servers' layouts (a Triton / OpenVINO Model Server repository)."""
