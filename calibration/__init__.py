"""Field calibration (torch-free): refit a bundle's bank, PCA, references and threshold on site."""
