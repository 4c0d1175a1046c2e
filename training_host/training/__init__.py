"""Fitting a product: bank and residual fields, the Swin's training loop and objectives (focal, ResMixMatch),
the fit cache, and the fit that writes a bundle."""
