"""Images in: dataset folders (MVTec layout), the built-in demo product, and synthetic anomalies made from good
images."""
