"""NTDH NYUDepthV2 semantic scene completion (SSCNet data) with cross-modal knowledge distillation."""
