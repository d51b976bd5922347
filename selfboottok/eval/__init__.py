"""Evaluation: PSNR/SSIM, FID and Inception Score with a pluggable Inception extractor,
codebook statistics, generator FLOPs, and the figures of a report."""
