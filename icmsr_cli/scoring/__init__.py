"""`icmsr eval`: PSNR/SSIM as the papers compute them, pairing SR with references, optional pyiqa metrics."""
