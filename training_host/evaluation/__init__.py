"""Metrics (AUROC, AP, PRO) and the evaluation of a bundle through the edge runtime's own inference path."""
