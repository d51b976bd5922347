"""Evaluation: PSNR/SSIM, FID and Inception Score with a pluggable Inception extractor,
codebook statistics, generator FLOPs, the domain evaluator and the generation metrics it
judges (class accuracy of samples, domain FD, k-NN precision/recall, guidance sweeps), one
call that measures a model (`evaluate.evaluate_model`), and the figures of a report."""
